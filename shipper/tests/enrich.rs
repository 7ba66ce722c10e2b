use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::harness::*;

/// Python's own HTTP server on a free port, serving `dir`.
struct HttpServer {
    child: Child,
    port: u16,
}

impl HttpServer {
    fn start(dir: &Path) -> HttpServer {
        let port = free_port();
        let child = Command::new("python3")
            .args(["-m", "http.server", "--bind", "127.0.0.1", &port.to_string()])
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 (Debian's python3, installed with the system)");
        let up = || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
        wait_for("the HTTP server listening", Duration::from_secs(10), up);
        HttpServer { child, port }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Lines of stream `name` at the receiver.
fn lines_of(env: &Env, name: &str) -> Vec<String> {
    let lines = output_lines(&env.out());
    let of = lines.into_iter().filter(|(s, _)| s == name);
    of.map(|(_, l)| String::from_utf8(l).unwrap()).collect()
}

/// A value served over HTTP, looked up by service, with a static field: each JSON record gets
/// its service's object, text passes unchanged; then an over-sized, an invalid answer and
/// the server gone are each refused and logged, and records keep the last good value.
#[test]
fn records_get_the_value_of_their_service_and_keep_the_last_good_one() {
    let env = Env::new();
    let (port, rm, sm) = (free_port(), free_port(), free_port());
    let _receiver = start_receiver(&env, port, rm, "");
    let www = env.path("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("owners.json"), r#"{"web": {"team": "a"}, "db": {"team": "b"}}"#)
        .unwrap();
    let server = HttpServer::start(&www);
    let pipe = env.path("app.pipe");
    let body = format!(
        "[[sources.pipe]]\npath = {pipe:?}\nservice = \"app\"\n\
         [[transforms.enrich]]\nname = \"owners\"\nfield = \"owner\"\n\
         url = \"http://127.0.0.1:{}/owners.json\"\ninterval_ms = 100\nbytes_max = 200\n\
         lookup = \"service\"\nfields = {{ colo = \"fra\" }}\n",
        server.port
    );
    let mut shipper = start_shipper(&env, port, sm, &body);
    let at = |name: &str| metric(&scrape_ok(sm), name, &[("transform", "owners")]);
    shipper.wait_alive("the value fetched", || at("shipper_enrich_refreshes_total") >= 1.0);
    let mut w = open_writer(&pipe);
    writeln!(w, "{{\"service\":\"web\",\"n\":1}}\n{{\"service\":\"db\",\"n\":2}}").unwrap();
    writeln!(w, "{{\"service\":\"other\",\"n\":3}}\nnot json").unwrap();
    shipper.wait_alive("four lines written", || {
        metric(&scrape_ok(rm), "shipper_receiver_records_written_total", &[]) == 4.0
    });
    assert_eq!(
        lines_of(&env, "web"),
        [r#"{"service":"web","n":1,"colo":"fra","owner":{"team":"a"}}"#]
    );
    assert_eq!(
        lines_of(&env, "db"),
        [r#"{"service":"db","n":2,"colo":"fra","owner":{"team":"b"}}"#]
    );
    assert_eq!(lines_of(&env, "other"), [r#"{"service":"other","n":3,"colo":"fra"}"#]);
    assert_eq!(lines_of(&env, "app"), ["not json"]);

    // Over bytes_max, then not JSON, then no server at all: each refused, the value kept.
    std::fs::write(www.join("owners.json"), format!("{{\"web\": \"{}\"}}", "x".repeat(300)))
        .unwrap();
    let log = shipper.log.clone();
    let logged = |what: &str| std::fs::read_to_string(&log).unwrap().contains(what);
    shipper.wait_alive("the over-sized answer refused", || logged("over bytes_max 200"));
    std::fs::write(www.join("owners.json"), "{\"web\": ").unwrap();
    shipper.wait_alive("the invalid answer refused", || logged("not JSON"));
    drop(server);
    let failed = at("shipper_enrich_refresh_failures_total");
    shipper.wait_alive("a fetch from no server refused", || {
        at("shipper_enrich_refresh_failures_total") > failed
    });
    writeln!(w, "{{\"service\":\"web\",\"n\":4}}").unwrap();
    shipper.wait_alive("the fifth line written", || {
        metric(&scrape_ok(rm), "shipper_receiver_records_written_total", &[]) == 5.0
    });
    assert_eq!(
        lines_of(&env, "web")[1],
        r#"{"service":"web","n":4,"colo":"fra","owner":{"team":"a"}}"#,
        "the last good value"
    );
    // Every JSON record (four), not the text line; counters are published every 250 ms.
    shipper.wait_alive("four records enriched", || {
        metric(&scrape_ok(sm), "shipper_enrich_records_total", &[]) == 4.0
    });
    drop(w);
    assert!(shipper.stop(Duration::from_secs(30)).success(), "{}", shipper.log_text());
}

/// A command's standard output, the whole value under its field, for every record.
#[test]
fn a_commands_output_goes_under_its_field() {
    let env = Env::new();
    let (port, rm, sm) = (free_port(), free_port(), free_port());
    let _receiver = start_receiver(&env, port, rm, "");
    let pipe = env.path("app.pipe");
    let body = format!(
        "[[sources.pipe]]\npath = {pipe:?}\n\
         [[transforms.enrich]]\nname = \"site\"\nfield = \"site\"\n\
         command = [\"/bin/sh\", \"-c\", \"printf '{{\\\"region\\\": \\\"eu\\\"}}'\"]\n"
    );
    let mut shipper = start_shipper(&env, port, sm, &body);
    shipper.wait_alive("the value fetched", || {
        metric(&scrape_ok(sm), "shipper_enrich_refreshes_total", &[]) >= 1.0
    });
    let mut w = open_writer(&pipe);
    writeln!(w, "{{\"service\":\"web\"}}").unwrap();
    shipper.wait_alive("the line written", || !lines_of(&env, "web").is_empty());
    assert_eq!(lines_of(&env, "web"), [r#"{"service":"web","site":{"region":"eu"}}"#]);
    drop(w);
    assert!(shipper.stop(Duration::from_secs(30)).success(), "{}", shipper.log_text());
}
