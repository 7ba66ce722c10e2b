use std::io::{BufWriter, Write};
use std::time::{Duration, Instant};

use crate::harness::*;

/// One service written as fast as possible into two pipes owned by different workers; a
/// quiet service alongside. The noisy service's admitted total over t seconds must be within
/// 5% of rate·t + burst; the quiet one loses nothing.
#[test]
fn one_service_on_two_cores_stays_within_its_global_rate() {
    const RATE: f64 = 2000.0;
    const BURST: f64 = 500.0;
    const QUIET: usize = 300;
    let run_for = Duration::from_secs(3);
    let env = Env::new();
    let (port, rm, sm) = (free_port(), free_port(), free_port());
    let _receiver = start_receiver(&env, port, rm, "");
    let (a, b, q) = (env.path("a.pipe"), env.path("b.pipe"), env.path("q.pipe"));
    let body = format!(
        "[[sources.pipe]]\npath = {a:?}\nworker = 0\npipe_bytes = 65536\n\
         [[sources.pipe]]\npath = {b:?}\nworker = 1\npipe_bytes = 65536\n\
         [[sources.pipe]]\npath = {q:?}\nworker = 0\n\
         [ratelimit]\nrate = {RATE}\nburst = {BURST}\n\
         [ratelimit.services.quiet]\nrate = 1000\nburst = 1000\n"
    );
    let mut shipper = start_shipper(&env, port, sm, &body);
    let noisy = |path: std::path::PathBuf| {
        std::thread::spawn(move || {
            let mut w = BufWriter::with_capacity(4096, open_writer(&path));
            let start = Instant::now();
            let mut n = 0u64;
            while start.elapsed() < run_for {
                writeln!(w, r#"{{"service":"noisy","n":{n}}}"#).unwrap();
                n += 1;
            }
            w.flush().unwrap();
            (start, Instant::now(), n)
        })
    };
    let (ta, tb) = (noisy(a), noisy(b));
    let quiet = std::thread::spawn(move || {
        let mut w = open_writer(&q);
        for n in 0..QUIET {
            writeln!(w, r#"{{"service":"quiet","n":{n}}}"#).unwrap();
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    let (sa, ea, na) = ta.join().unwrap();
    let (sb, eb, nb) = tb.join().unwrap();
    quiet.join().unwrap();
    let t = (ea.max(eb) - sa.min(sb)).as_secs_f64();
    let written = (na + nb) as f64;
    shipper.wait_alive("every noisy line counted", || {
        let text = scrape_ok(sm);
        let seen = metric(&text, "shipper_lines_admitted_total", &[("service", "noisy")])
            + metric(&text, "shipper_lines_dropped_total", &[("service", "noisy")]);
        seen >= written
    });
    assert!(shipper.stop(Duration::from_secs(30)).success());
    let lines = output_lines(&env.out());
    let count = |s: &str| lines.iter().filter(|(stream, _)| stream == s).count();
    let admitted = count("noisy") as f64;
    let expected = RATE * t + BURST;
    let error = (admitted - expected).abs() / expected;
    assert!(error <= 0.05, "admitted {admitted} of {written} in {t:.3} s; expected {expected:.0} ±5% (error {error:.3})");
    assert!(
        written > 2.0 * expected,
        "the writers must outpace the limit for the test to mean anything"
    );
    assert_eq!(count("quiet"), QUIET, "the quiet service is unaffected");
    let text = scrape(sm);
    assert!(text.is_none(), "shipper has exited");
}

/// Past `services_max`, services share the `_other` bucket and label, but every record still
/// goes to the stream of its own key.
#[test]
fn services_past_services_max_share_a_bucket_but_keep_their_own_streams() {
    // Regression: records of the services past the table's room were written to `_other/`.
    const SERVICES: usize = 6;
    const EACH: usize = 3;
    let env = Env::new();
    let (port, rm, sm) = (free_port(), free_port(), free_port());
    let _receiver = start_receiver(&env, port, rm, "");
    let pipe = env.path("app.pipe");
    // The pipe's own service ("app") takes one of the three places, s0 and s1 the others.
    let body = format!("[[sources.pipe]]\npath = {pipe:?}\n[ratelimit]\nservices_max = 3\n");
    let mut shipper = start_shipper(&env, port, sm, &body);
    let mut w = open_writer(&pipe);
    let mut want = Vec::new();
    for s in 0..SERVICES {
        for n in 0..EACH {
            let line = format!(r#"{{"service":"s{s}","n":{n}}}"#);
            writeln!(w, "{line}").unwrap();
            want.push((format!("s{s}"), line.into_bytes()));
        }
    }
    drop(w);
    shipper.wait_alive("every line acknowledged", || {
        metric_at(sm, "shipper_records_acked_total", &[]) == (SERVICES * EACH) as f64
    });
    let mut got = output_lines(&env.out());
    got.sort();
    assert_eq!(got, want, "each service in its own stream");
    let admitted = |service| metric_at(sm, "shipper_lines_admitted_total", &[("service", service)]);
    assert_eq!((admitted("s0"), admitted("s1")), (EACH as f64, EACH as f64));
    assert_eq!(admitted("_other"), ((SERVICES - 2) * EACH) as f64);
    assert!(shipper.stop(Duration::from_secs(30)).success());
}

/// 3,000 services through one worker with `services_max = 1024`: every line in its own
/// stream, the services past the table's room counted under `_other`; once the burst's
/// services are idle for `services_idle_s` they are forgotten, and a new service gets its own
/// bucket and label again.
#[test]
fn a_burst_of_services_is_forgotten_once_idle_and_new_services_get_their_own_label() {
    // Regression: the table never forgot a key, so one burst of invented keys sent every
    // later service to `_other` until the shipper restarted.
    const SERVICES: usize = 3000;
    const ROOM: usize = 1024;
    let env = Env::new();
    let (port, rm, sm) = (free_port(), free_port(), free_port());
    let text = env.receiver_toml(port, rm, "");
    let text = text.replace("fsync = false", "fsync = false\nstreams_max = 4096");
    let _receiver = start_receiver_toml(&env, port, rm, &text);
    let pipe = env.path("app.pipe");
    let body = format!(
        "[[sources.pipe]]\npath = {pipe:?}\nworker = 0\n\
         [ratelimit]\nservices_max = {ROOM}\nservices_idle_s = 1\n"
    );
    let mut shipper = start_shipper(&env, port, sm, &body);
    let mut w = BufWriter::new(open_writer(&pipe));
    let mut want = Vec::new();
    for s in 0..SERVICES {
        let line = format!(r#"{{"service":"s{s}"}}"#);
        writeln!(w, "{line}").unwrap();
        want.push((format!("s{s}"), line.into_bytes()));
    }
    w.flush().unwrap();
    shipper.wait_alive("every line acknowledged", || {
        metric_at(sm, "shipper_records_acked_total", &[]) == SERVICES as f64
    });
    let admitted = |service| metric_at(sm, "shipper_lines_admitted_total", &[("service", service)]);
    // The pipe's own service ("app") holds one place: s0..s1022 take the rest, the others
    // share `_other` (whose label is never forgotten). Those 1,023 may be forgotten already
    // (`services_idle_s` is 1 s and acknowledgements can take longer on a loaded machine):
    // each place is counted once, live or forgotten, in one scrape.
    assert_eq!(admitted("_other"), (SERVICES - (ROOM - 1)) as f64);
    let core0 = [("core", "0")];
    let text = scrape_ok(sm);
    let live = metric(&text, "shipper_services", &core0);
    let forgotten = metric(&text, "shipper_services_forgotten_total", &core0);
    assert_eq!(live + forgotten, (ROOM + 1) as f64, "{live} live, {forgotten} forgotten");
    shipper.wait_alive("the burst's services forgotten", || {
        metric_at(sm, "shipper_services_forgotten_total", &core0) == (ROOM - 1) as f64
    });
    assert_eq!(metric_at(sm, "shipper_services", &core0), 2.0, "_other and app stay");
    writeln!(w, r#"{{"service":"late"}}"#).unwrap();
    w.flush().unwrap();
    want.push(("late".into(), br#"{"service":"late"}"#.to_vec()));
    shipper.wait_alive("the late line acknowledged", || {
        metric_at(sm, "shipper_records_acked_total", &[]) == (SERVICES + 1) as f64
    });
    assert_eq!(admitted("late"), 1.0, "a new service gets its own label again");
    assert_eq!(admitted("_other"), (SERVICES - (ROOM - 1)) as f64);
    let mut got = output_lines(&env.out());
    got.sort();
    want.sort();
    assert_eq!(got.len(), want.len());
    assert!(got == want, "each service in its own stream");
    assert!(shipper.stop(Duration::from_secs(30)).success());
}
