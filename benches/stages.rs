//! One group per stage of the data path, each with its baseline beside it:
//! - split: `LineSplitter` vs `slice::split` on `\n`
//! - extract: `Parser::extract` (one-pass scanner) vs the simd-json tape it replaced
//!   (`TapeParser`) vs `serde_json::Value` then `get`
//! - ratelimit: per-core `RateLimiter::admit` vs one bucket behind a `Mutex` (the global lock
//!   a shared-state limiter takes per record)
//! - zstd: levels 1 and 3 vs a plain copy of the batch
//! - frame: encode + decode with checksum vs a plain copy of the frame bytes
//! - chain: the whole transform chain per record, with a static enrichment field and with a
//!   fetched value looked up by service, vs the chain without enrichment

use std::hint::black_box;
use std::sync::Mutex;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use shipper::config::shipper::Format;
use shipper::protocol::frame::{Header, Kind, HEADER_BYTES};
use shipper::protocol::FrameDecoder;
use shipper::sources::lines::LineSplitter;
use shipper::transforms::parse::tape::TapeParser;
use shipper::transforms::parse::Parser;
use shipper::transforms::ratelimit::RateLimiter;
use shipper_benches::json_lines;

const LINES: usize = 10_000;

fn split(c: &mut Criterion) {
    let data = json_lines(LINES);
    let mut g = c.benchmark_group("split");
    g.throughput(Throughput::Elements(LINES as u64));
    g.bench_function("line_splitter", |b| {
        let mut s = LineSplitter::new(64 << 10);
        b.iter(|| {
            let mut n = 0usize;
            for chunk in data.chunks(256 << 10) {
                s.split(chunk, |l| n += l.bytes.len());
            }
            black_box(n)
        })
    });
    g.bench_function("baseline_slice_split", |b| {
        b.iter(|| black_box(data.split(|&c| c == b'\n').map(<[u8]>::len).sum::<usize>()))
    });
    g.finish();
}

fn extract(c: &mut Criterion) {
    let data = json_lines(LINES);
    let lines: Vec<&[u8]> = data.split(|&c| c == b'\n').filter(|l| !l.is_empty()).collect();
    let mut g = c.benchmark_group("extract");
    g.throughput(Throughput::Elements(lines.len() as u64));
    g.bench_function("scanner", |b| {
        let mut p = Parser::default();
        b.iter(|| {
            for l in &lines {
                black_box(
                    p.extract(l, Format::Json, "service").map(|f| f.key.map(<[u8]>::len)).ok(),
                );
            }
        })
    });
    g.bench_function("baseline_simd_json_tape", |b| {
        let mut p = TapeParser::default();
        b.iter(|| {
            for l in &lines {
                black_box(
                    p.extract(l, Format::Json, "service").map(|f| f.key.map(<[u8]>::len)).ok(),
                );
            }
        })
    });
    g.bench_function("baseline_serde_json_value", |b| {
        b.iter(|| {
            for l in &lines {
                let v: serde_json::Value = serde_json::from_slice(l).unwrap();
                black_box(v.get("service").and_then(|s| s.as_str()).map(str::len));
            }
        })
    });
    g.finish();
}

fn ratelimit(c: &mut Criterion) {
    let mut g = c.benchmark_group("ratelimit");
    g.throughput(Throughput::Elements(LINES as u64));
    g.bench_function("per_core_buckets", |b| {
        let mut l = RateLimiter::default();
        for id in 0..16 {
            l.add(id, 1_000_000, 1_000_000, 0.5, 0);
        }
        let mut now = 0u64;
        b.iter(|| {
            for i in 0..LINES as u32 {
                now += 100;
                black_box(l.admit(i % 16, now));
            }
        })
    });
    g.bench_function("baseline_global_mutex", |b| {
        let buckets = Mutex::new(vec![(1_000_000f64, 0u64); 16]);
        let mut now = 0u64;
        b.iter(|| {
            for i in 0..LINES {
                now += 100;
                let mut g = buckets.lock().unwrap();
                let (tokens, last) = &mut g[i % 16];
                *tokens = (*tokens + (now - *last) as f64 * 1e-3).min(1e6);
                *last = now;
                let ok = *tokens >= 1.0;
                *tokens -= f64::from(u8::from(ok));
                black_box(ok);
            }
        })
    });
    g.finish();
}

fn zstd_levels(c: &mut Criterion) {
    let batch = json_lines(3400); // about one default 1 MiB batch
    let mut g = c.benchmark_group("zstd");
    g.throughput(Throughput::Bytes(batch.len() as u64));
    for level in [1, 3] {
        g.bench_function(format!("level_{level}"), |b| {
            let mut z = zstd::bulk::Compressor::new(level).unwrap();
            b.iter(|| black_box(z.compress(&batch).unwrap().len()))
        });
    }
    g.bench_function("baseline_copy", |b| b.iter(|| black_box(batch.to_vec().len())));
    g.finish();
}

fn frame(c: &mut Criterion) {
    let payload = zstd::bulk::compress(&json_lines(3400), 1).unwrap();
    let len = payload.len() as u32;
    let h = Header { kind: Kind::Data, flags: 1, seq: 7, count: 3400, raw_len: len * 8, len };
    let mut g = c.benchmark_group("frame");
    g.throughput(Throughput::Bytes(u64::from(len) + HEADER_BYTES as u64));
    g.bench_function("encode_decode_crc32c", |b| {
        b.iter_batched(
            || FrameDecoder::new(64 << 20),
            |mut dec| {
                let mut wire = Vec::with_capacity(payload.len() + HEADER_BYTES);
                h.encode(&payload, &mut wire);
                wire.extend_from_slice(&payload);
                dec.push(&wire);
                black_box(dec.next_frame().unwrap().unwrap().payload.len())
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("baseline_copy_twice", |b| {
        b.iter(|| {
            let wire = payload.to_vec();
            black_box(wire.to_vec().len())
        })
    });
    g.finish();
}

/// The transform chain per record (decode, services, rate limit, enrich) with enrichments,
/// beside the same chain without any.
fn chain(c: &mut Criterion) {
    use shipper::config::enrich::{EnrichSection, Lookup};
    use shipper::record::Record;
    use shipper::transforms::enrich::feed::Feed;
    use shipper::transforms::enrich::Enrich;
    use shipper::transforms::{Chain, Decode};
    let data = json_lines(LINES);
    let lines: Vec<&[u8]> = data.split(|&c| c == b'\n').filter(|l| !l.is_empty()).collect();
    #[derive(serde::Deserialize)]
    struct T {
        enrich: Vec<EnrichSection>,
    }
    let config = |text: &str| toml::from_str::<T>(text).unwrap().enrich;
    let owners: String = (0..64).map(|i| format!("\"svc-{i}\":{{\"team\":\"t{i}\"}},")).collect();
    let owners = format!("{{{}\"_\":null}}", owners);
    type Variant = (&'static str, Vec<EnrichSection>, Vec<std::sync::Arc<Feed>>);
    let variants: [Variant; 3] = [
        ("baseline_no_enrichment", Vec::new(), Vec::new()),
        ("static_field", config("[[enrich]]\nname = \"s\"\nfields = { colo = \"fra\" }\n"), Vec::new()),
        (
            "lookup_by_service",
            config("[[enrich]]\nname = \"o\"\nfield = \"owner\"\ncommand = [\"x\"]\nlookup = \"service\"\n"),
            vec![Feed::fixed(owners.as_bytes(), Some(Lookup::Service)).unwrap()],
        ),
    ];
    let mut g = c.benchmark_group("chain");
    g.throughput(Throughput::Elements(lines.len() as u64));
    for (name, configs, feeds) in variants {
        let rl = shipper::config::shipper::RateLimitSection::default();
        let mut chain = Chain::new(&rl, Enrich::new(&configs, &feeds), 1);
        let source = chain.add_source(Decode::Line(Format::Json), Some("app"), 0);
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut bytes = 0;
                for l in &lines {
                    let (_, admitted) = chain.run(source, Record::bare(l), 1);
                    bytes += admitted.map_or(0, |a| a.body.len());
                }
                black_box(bytes)
            })
        });
    }
    g.finish();
}

criterion_group!(benches, split, extract, ratelimit, zstd_levels, frame, chain);
criterion_main!(benches);
