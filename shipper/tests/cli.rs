use std::io::Write;
use std::process::Command;

use crate::harness::*;

fn shipper(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    let text = |b: Vec<u8>| String::from_utf8(b).unwrap();
    (out.status.code().unwrap(), text(out.stdout), text(out.stderr))
}

#[test]
fn version_and_help() {
    let (code, out, _) = shipper(&["--version"]);
    assert_eq!((code, out.trim()), (0, concat!("shipper ", env!("CARGO_PKG_VERSION"))));
    for sub in ["run", "receive", "validate", "dev-certs"] {
        let (code, out, _) = shipper(&[sub, "--help"]);
        assert_eq!(code, 0, "{sub} --help");
        assert!(out.contains("Usage: shipper"), "{sub} --help: {out}");
    }
    let (code, _, err) = shipper(&["run"]);
    assert_eq!(code, 2, "missing --config is a usage error: {err}");
}

/// The shipped examples validate once their certificate paths exist.
#[test]
fn examples_are_valid() {
    let env = Env::new();
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples");
    let pki = env.pki.ca.parent().unwrap().to_str().unwrap().to_string() + "/";
    for name in ["edge.toml", "receiver.toml"] {
        let text = std::fs::read_to_string(format!("{root}/{name}")).unwrap();
        let path = env.write(name, &text.replace("/etc/shipper/tls/", &pki));
        let (code, out, err) = shipper(&["validate", "--config", path.to_str().unwrap()]);
        assert_eq!(code, 0, "{name}: {err}");
        assert!(out.contains("valid"), "{out}");
    }
}

/// Configuration mistakes added to a valid shipper configuration: the text added, the key
/// the error must name (its last component is on the line named), and the message.
const INVALID: &[(&str, &str, &str)] = &[
    ("[batch]\nbatch_byte_max = 5\n", "batch_byte_max", "unknown field `batch_byte_max`"),
    ("[ratelimit]\nrate = \"fast\"\n", "rate", "invalid type: string \"fast\""),
    (
        "[[sources.pipe]]\npath = \"/tmp/x.pipe\"\nmode = \"999\"\n",
        "sources.pipe[0].mode",
        "\"999\" is not an octal file mode",
    ),
    ("[batch]\nzstd_level = 40\n", "batch.zstd_level", "40 is out of range (allowed: 1 to 19)"),
    (
        "[batch]\nflush_interval_ms = 20\nidle_seal_delay_ms = 50\n",
        "batch.idle_seal_delay_ms",
        "50 is above flush_interval_ms (20)",
    ),
    (
        "[[sources.socket]]\nname = \"s\"\ntransport = \"sctp\"\n",
        "transport",
        "unknown variant `sctp`, expected one of `udp`, `tcp`, `unix`",
    ),
    (
        "[[sources.socket]]\nname = \"s\"\ntransport = \"tcp\"\naddress = \"h:1\"\nframe = 1\n",
        "frame",
        "unknown field `frame`",
    ),
    (
        "[[sources.socket]]\nname = \"s\"\ntransport = \"udp\"\naddress = \"nowhere:514\"\n",
        "sources.socket[0].address",
        "\"nowhere:514\" is not an ip:port address",
    ),
    (
        "[[sources.socket]]\nname = \"s\"\ntransport = \"unix\"\n",
        "sources.socket[0].transport",
        "transport unix needs a path",
    ),
    (
        "[[sources.socket]]\nname = \"s\"\ntransport = \"udp\"\naddress = \"127.0.0.1:514\"\n\
         framing = \"newline\"\n",
        "sources.socket[0].framing",
        "only for transport tcp, not udp",
    ),
    (
        "[[sources.socket]]\nname = \"s\"\ntransport = \"tcp\"\naddress = \"[::1]:514\"\n\
         message_bytes_max = 10\n",
        "sources.socket[0].message_bytes_max",
        "10 is out of range (allowed: 256 to 16777216)",
    ),
    (
        "[[sources.socket]]\nname = \"s\"\ntransport = \"udp\"\naddress = \"127.0.0.1:514\"\n\
         idle_timeout_ms = 1000\n",
        "sources.socket[0].idle_timeout_ms",
        "only for transport tcp, not udp",
    ),
    (
        "[[sources.socket]]\nname = \"s\"\ntransport = \"tcp\"\naddress = \"127.0.0.1:514\"\n\
         idle_timeout_ms = 10\n",
        "sources.socket[0].idle_timeout_ms",
        "10 is out of range (allowed: 100 to 86400000)",
    ),
    (
        "[[sources.socket]]\nname = \"s\"\ntransport = \"unix\"\npath = \"/dev/log\"\n\
         [[sources.socket]]\nname = \"s\"\ntransport = \"udp\"\naddress = \"0.0.0.0:514\"\n",
        "sources.socket[1].name",
        "\"s\" is the name of an earlier socket source",
    ),
];

/// Each kind of mistake names the file, the line and the key.
#[test]
fn invalid_configurations_name_file_line_and_key() {
    let env = Env::new();
    let base = env.shipper_toml(7000, 9000, "");
    for (extra, key, message) in INVALID {
        let text = format!("{base}{extra}");
        let leaf = format!("{} =", key.rsplit('.').next().unwrap());
        // The last line with the key: the base's [shipper] has a `name` of its own.
        let lines: Vec<&str> = text.lines().collect();
        let line = lines.iter().rposition(|l| l.starts_with(&leaf)).unwrap() + 1;
        let path = env.write("bad.toml", &text);
        let (code, _, err) = shipper(&["validate", "--config", path.to_str().unwrap()]);
        assert_eq!(code, 1, "{extra}");
        let want = format!("{}:{line}: {key}: {message}", path.display());
        assert!(err.contains(&want), "expected {want:?} in:\n{err}");
    }
    let (code, _, err) = shipper(&["validate", "--config", "/nonexistent.toml"]);
    assert_eq!(code, 1);
    assert!(err.contains("/nonexistent.toml: cannot read configuration"), "{err}");
}

// Regression: the FIFO was created and chmod-ed through a path that follows symbolic links, as
// root: a link planted at a pipe's path made the shipper chmod and open its target.
#[test]
fn a_symlink_planted_at_a_fifo_path_is_refused_and_never_followed() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    let target = env.write("secret.txt", "do not touch\n");
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600)).unwrap();
    let pipe = env.path("app.pipe");
    std::os::unix::fs::symlink(&target, &pipe).unwrap();
    let body = format!("[[sources.pipe]]\npath = {pipe:?}\nmode = \"0666\"\n");
    let cfg = env.write("edge.toml", &env.shipper_toml(free_port(), free_port(), &body));
    let (code, _, err) = shipper(&["run", "--no-ebpf", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&format!("{}: is a symbolic link", pipe.display())), "{err}");
    let mode = std::fs::metadata(&target).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the link's target keeps its mode");
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "do not touch\n");
}

/// Every file and directory the shipper (disk buffer) and the receiver (streams, state)
/// create has the configured mode, whatever it was before (0644 from the umask).
#[test]
fn files_created_have_the_configured_modes() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    let (port, rm, sm) = (free_port(), free_port(), free_port());
    let pipe = env.path("app.pipe");
    let buffer = env.path("buffer");
    let body = format!("[[sources.pipe]]\npath = {pipe:?}\n[buffer]\ndirectory = {buffer:?}\n");
    let modes = "file_mode = \"0600\"\ndir_mode = \"0700\"\n";
    let cfg = env
        .shipper_toml(port, sm, &body)
        .replace("shutdown_timeout_ms = 20000\n", &format!("shutdown_timeout_ms = 20000\n{modes}"));
    let path = env.write("edge.toml", &cfg);
    let mut shipper =
        Proc::start("shipper", &["run", "--config", path.to_str().unwrap()], sm, env.path("s.log"));
    // No receiver yet: the line goes to the disk buffer.
    writeln!(open_writer(&pipe), "{{\"service\":\"app\",\"n\":1}}").unwrap();
    shipper.wait_alive("the line in the disk buffer", || {
        metric_at(sm, "shipper_buffer_records_written_total", &[]) == 1.0
    });
    let text = env
        .receiver_toml(port, rm, "")
        .replace("fsync = false\n", &format!("fsync = false\n{modes}"));
    let _receiver = start_receiver_toml(&env, port, rm, &text);
    shipper.wait_alive("the line delivered", || {
        metric_at(sm, "shipper_records_acked_total", &[]) == 1.0
    });
    let mut checked = 0;
    let mut walk = vec![buffer.join("core-0"), buffer.join("core-1"), env.out()];
    while let Some(p) = walk.pop() {
        let meta = std::fs::symlink_metadata(&p).unwrap();
        let mode = meta.permissions().mode() & 0o777;
        let want = if meta.is_dir() { 0o700 } else { 0o600 };
        // The output directory itself and the test's own files are not the receiver's to make.
        if p != env.out() {
            assert_eq!(mode, want, "{}", p.display());
            checked += 1;
        }
        if meta.is_dir() {
            walk.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        }
    }
    // Two buffer directories, a segment, a stream directory and file, `.state`, base, 2 logs.
    assert!(checked >= 8, "only {checked} paths checked");
}

/// Logs written to a file carry no colour codes; `SHIPPER_LOG_FORMAT=json` makes each log
/// line one JSON object; another value is a usage error.
#[test]
fn logs_are_plain_in_a_file_and_json_when_asked() {
    // Regression: logs carried ANSI colour escapes even when written to a file or the journal.
    let env = Env::new();
    // A pipe in a directory that does not exist: start-up logs, then fails with its name.
    let missing = env.path("no-such-dir").join("app.pipe");
    let body = format!("[[sources.pipe]]\npath = {missing:?}\n");
    let cfg = env.write("edge.toml", &env.shipper_toml(free_port(), free_port(), &body));
    let run = |format: Option<&str>| {
        let mut c = Command::new(BIN);
        c.args(["run", "--no-ebpf", "--config", cfg.to_str().unwrap()]);
        c.env_remove("SHIPPER_LOG_FORMAT");
        if let Some(f) = format {
            c.env("SHIPPER_LOG_FORMAT", f);
        }
        let out = c.output().unwrap();
        (out.status.code().unwrap(), String::from_utf8(out.stderr).unwrap())
    };
    let (code, text) = run(None);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("open-file limit"), "{text}");
    assert!(!text.contains('\x1b'), "colour codes in a file: {text:?}");
    let (code, json) = run(Some("json"));
    assert_eq!(code, 1, "{json}");
    let logged: Vec<serde_json::Value> = json
        .lines()
        .filter(|l| !l.starts_with("error: "))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(!logged.is_empty(), "{json}");
    let first = &logged[0];
    assert_eq!(first["level"], "INFO", "{first}");
    assert!(first["fields"]["message"].as_str().unwrap().contains("open-file limit"), "{first}");
    let (code, err) = run(Some("xml"));
    assert_eq!(code, 2, "{err}");
    assert_eq!(err.trim(), "error: SHIPPER_LOG_FORMAT: \"xml\" is neither \"text\" nor \"json\"");
}
