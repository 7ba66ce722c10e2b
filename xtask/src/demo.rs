//! `cargo xtask demo`: the whole path on loopback, in under a minute. It installs nothing;
//! the first build shows cargo's progress (the `xtask` alias is not `--quiet`).

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::bail;
use shipper::metrics::http::get;
use shipper::metrics::text::sum;

use crate::daemon::{free_port, Daemon};

const LINES_PER_PIPE: usize = 100_000;
const SERVICES: [&str; 4] = ["nginx", "api", "db", "chatty"];
const FORMATS: [&str; 2] = ["http_access", "dns_query"];

pub fn run() -> anyhow::Result<()> {
    build()?;
    let root = crate::root();
    let bin = root.join("target/release/shipper");
    let dir = root.join("demo");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let pki = shipper::tls::pki::generate(&dir.join("tls"), &["localhost".into()])?;
    let (port, rm, sm) = (free_port()?, free_port()?, free_port()?);
    let receiver_cfg = format!(
        "[receiver]\nlisten = \"127.0.0.1:{port}\"\nworkers = 2\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n\
         [output]\ndirectory = {:?}\nfsync = false\n[metrics]\nlisten = \"127.0.0.1:{rm}\"\n",
        pki.ca, pki.receiver_cert, pki.receiver_key, dir.join("received")
    );
    let (app, cfjs1) = (dir.join("app.pipe"), dir.join("cfjs1.pipe"));
    let shipper_cfg = format!(
        "[shipper]\nname = \"demo\"\n[metrics]\nlisten = \"127.0.0.1:{sm}\"\n\
         [[sources.pipe]]\npath = {app:?}\nservice = \"app\"\n\
         [[sources.pipe]]\npath = {cfjs1:?}\nformat = \"cfjs1\"\n\
         [ratelimit.services.chatty]\nrate = 2000\nburst = 1000\n\
         [receivers]\nprimary = [\"127.0.0.1:{port}\"]\n\
         [tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\nserver_name = \"localhost\"\n",
        pki.ca, pki.shipper_cert, pki.shipper_key
    );
    std::fs::write(dir.join("receiver.toml"), receiver_cfg)?;
    std::fs::write(dir.join("edge.toml"), shipper_cfg)?;
    println!("\n== demo in {}", dir.display());
    let start = |cmd, name: &str, metrics: u16| {
        let (cfg, log) = (dir.join(format!("{name}.toml")), dir.join(format!("{name}.log")));
        let d = Daemon::start(&bin, cmd, &cfg, &log, &format!("127.0.0.1:{metrics}"))?;
        println!("   started {name} (metrics on 127.0.0.1:{metrics})");
        anyhow::Ok(d)
    };
    let receiver = start("receive", "receiver", rm)?;
    let shipper = start("run", "edge", sm)?;
    let started = Instant::now();
    let writers = [
        std::thread::spawn(move || write_json(&app)),
        std::thread::spawn(move || write_cfjs1(&cfjs1)),
    ];
    let total = (2 * LINES_PER_PIPE) as f64;
    let shipper_metrics = format!("127.0.0.1:{sm}");
    loop {
        let text = get(&shipper_metrics).unwrap_or_default();
        let read = sum(&text, "shipper_source_lines_read_total", &[]);
        let acked = sum(&text, "shipper_records_acked_total", &[]);
        let dropped = sum(&text, "shipper_lines_dropped_total", &[]);
        print!(
            "\r   read {read:>8.0}   acknowledged {acked:>8.0}   rate-limited {dropped:>7.0}   "
        );
        std::io::stdout().flush()?;
        if read >= total && acked + dropped >= read {
            break;
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!("the demo did not finish in 2 minutes; logs are in {}", dir.display());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    for w in writers {
        w.join().expect("writer thread")?;
    }
    println!("\n   done in {:.2} s\n", started.elapsed().as_secs_f64());
    report(&dir.join("received"), &get(&shipper_metrics).unwrap_or_default())?;
    println!("   shipper stopped: {}", shipper.stop()?);
    println!("   receiver stopped: {}", receiver.stop()?);
    Ok(())
}

/// Builds the release binary, installing only what any build needs (cmake and C/C++
/// compilers for librdkafka): the demo shows no kernel counters, so without the eBPF
/// toolchain (`cargo xtask setup` installs it) it leaves out their programs.
fn build() -> anyhow::Result<()> {
    crate::setup::install(crate::setup::BUILD_PACKAGES)?;
    let mut args = vec!["build", "--release", "-p", "shipper"];
    if !crate::setup::ebpf_toolchain_ready() {
        println!("no eBPF toolchain (`cargo xtask setup`): building without the kernel programs");
        args.push("--no-default-features");
    }
    crate::run("cargo", &args)
}

fn write_json(path: &PathBuf) -> anyhow::Result<()> {
    let mut w = BufWriter::new(std::fs::OpenOptions::new().write(true).open(path)?);
    for i in 0..LINES_PER_PIPE {
        let service = SERVICES[i % SERVICES.len()];
        writeln!(
            w,
            r#"{{"ts":"2026-11-21T12:00:{:02}.{:06}Z","level":"info","service":"{service}","msg":"handled request","req":{{"id":{i},"status":200,"ms":{}}}}}"#,
            i / 1_000_000 % 60,
            i % 1_000_000,
            i % 97
        )?;
    }
    Ok(w.flush()?)
}

fn write_cfjs1(path: &PathBuf) -> anyhow::Result<()> {
    let mut w = BufWriter::new(std::fs::OpenOptions::new().write(true).open(path)?);
    for i in 0..LINES_PER_PIPE {
        let format = FORMATS[i % FORMATS.len()];
        writeln!(
            w,
            r#"{{"format":"{format}","{format}":{{"seq":{i},"colo":"ams","bytes":{}}}}}"#,
            i * 7 % 4096
        )?;
    }
    Ok(w.flush()?)
}

fn report(out: &Path, metrics: &str) -> anyhow::Result<()> {
    println!("   what arrived ({}):", out.display());
    let mut streams: Vec<_> = std::fs::read_dir(out)?
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    streams.sort_by_key(|e| e.file_name());
    for s in streams {
        let mut lines = 0;
        let mut sample = String::new();
        for f in std::fs::read_dir(s.path())?.flatten() {
            let text = std::fs::read_to_string(f.path())?;
            lines += text.lines().count();
            if sample.is_empty() {
                sample = text.lines().next().unwrap_or_default().chars().take(90).collect();
            }
        }
        println!("   {:<14} {lines:>7} lines   {sample}", s.file_name().to_string_lossy());
    }
    println!(
        "\n   per core        lines read   admitted   rate-limited   frames   p50 ack     p99 ack"
    );
    for core in ["0", "1", "2", "3"] {
        let c = [("core", core)];
        let read = sum(metrics, "shipper_source_lines_read_total", &c);
        if read == 0.0 && core != "0" {
            continue;
        }
        let q = |q: &str| {
            sum(metrics, "shipper_read_to_ack_latency_seconds", &[("core", core), ("quantile", q)])
                * 1e3
        };
        println!(
            "   core {core:<10} {read:>10.0} {:>10.0} {:>14.0} {:>8.0} {:>7.1} ms {:>8.1} ms",
            sum(metrics, "shipper_lines_admitted_total", &c),
            sum(metrics, "shipper_lines_dropped_total", &c),
            sum(metrics, "shipper_frames_acked_total", &c),
            q("0.5"),
            q("0.99"),
        );
    }
    println!();
    Ok(())
}
