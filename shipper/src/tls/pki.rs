//! A throw-away PKI for demos and tests: one CA, a receiver certificate and two shipper client
//! certificates (two hosts), written as PEM files. Production fleets bring their own PKI.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

/// Paths of the files [`generate`] writes.
#[derive(Clone, Debug)]
pub struct DevPki {
    pub ca: PathBuf,
    pub receiver_cert: PathBuf,
    pub receiver_key: PathBuf,
    pub shipper_cert: PathBuf,
    pub shipper_key: PathBuf,
    /// A second client certificate, as another host of the fleet would have.
    pub other_shipper_cert: PathBuf,
    pub other_shipper_key: PathBuf,
}

impl DevPki {
    pub fn paths(dir: &Path) -> DevPki {
        DevPki {
            ca: dir.join("ca.pem"),
            receiver_cert: dir.join("receiver.pem"),
            receiver_key: dir.join("receiver.key"),
            shipper_cert: dir.join("shipper.pem"),
            shipper_key: dir.join("shipper.key"),
            other_shipper_cert: dir.join("shipper-2.pem"),
            other_shipper_key: dir.join("shipper-2.key"),
        }
    }
}

/// Writes a CA and three leaf certificates into `dir`. The receiver certificate is valid for
/// `receiver_names` (DNS names or IP addresses). Keys are written with mode 0600.
pub fn generate(dir: &Path, receiver_names: &[String]) -> anyhow::Result<DevPki> {
    std::fs::create_dir_all(dir)?;
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "shipper development CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = ca_params.self_signed(&ca_key)?;

    let leaf = |names: Vec<String>, cn: &str, usage| -> anyhow::Result<(String, String)> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names)?;
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &ca, &ca_key)?;
        Ok((cert.pem(), key.serialize_pem()))
    };
    let pki = DevPki::paths(dir);
    let (rc, rk) =
        leaf(receiver_names.to_vec(), "shipper receiver", ExtendedKeyUsagePurpose::ServerAuth)?;
    let (sc, sk) = leaf(vec!["shipper".into()], "shipper", ExtendedKeyUsagePurpose::ClientAuth)?;
    let client = ExtendedKeyUsagePurpose::ClientAuth;
    let (oc, ok) = leaf(vec!["shipper-2".into()], "shipper-2", client)?;
    std::fs::write(&pki.ca, ca.pem())?;
    std::fs::write(&pki.receiver_cert, rc)?;
    write_secret(&pki.receiver_key, &rk)?;
    std::fs::write(&pki.shipper_cert, sc)?;
    write_secret(&pki.shipper_key, &sk)?;
    std::fs::write(&pki.other_shipper_cert, oc)?;
    write_secret(&pki.other_shipper_key, &ok)?;
    Ok(pki)
}

fn write_secret(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())
}
