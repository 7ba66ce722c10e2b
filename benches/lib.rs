//! Inputs shared by the micro-benchmarks in `stages.rs` (run with `cargo bench`).

/// `n` JSON lines of about 300 bytes, newline-terminated, 16 services.
pub fn json_lines(n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n * 310);
    for i in 0..n {
        let line = format!(
            r#"{{"ts":"2026-11-21T12:00:00.{:06}Z","level":"info","service":"svc-{:02}","host":"edge-12.ams","msg":"GET /api/v1/items/{i} 200 in {}ms","req":{{"id":"{:016x}","ua":"curl/7.88.1","bytes":{}}},"trace":"{:032x}","note":"cache miss upstream ok"}}"#,
            i % 1_000_000,
            i % 16,
            i % 97,
            (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
            i % 5000,
            (i as u128).wrapping_mul(0x2545_f491_4f6c_dd1d_9e37_79b9),
        );
        out.extend_from_slice(line.as_bytes());
        out.push(b'\n');
    }
    out
}
