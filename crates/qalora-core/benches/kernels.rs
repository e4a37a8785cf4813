//! Criterion benchmarks of the core kernels, throughput in bytes of the packed weight
//! (plus f16 scales/offsets) for qmatmul, scalar twin vs the dispatched SIMD kernel: exact,
//! with int8 activations (canonical and tiled layouts) and with bf16 activations.
//! Run: `cargo bench -p qalora-core --bench kernels` (QALORA_BENCH_QUICK=1 for a short run).

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use qalora_core::group_pool::group_pool;
use qalora_core::matmul::exact::qmatmul_with;
use qalora_core::matmul::{bf16, int8, tiled, GroupParams};
use qalora_core::pack::{pack, unpack};
use qalora_core::quant::{dequantize, quantize, ParamDtype};
use qalora_core::testutil::{random_codes, random_f32};
use qalora_core::Isa;
use qalora_core::QuantLayout;
use std::time::Duration;

fn quick() -> bool {
    std::env::var("QALORA_BENCH_QUICK").is_ok()
}

fn bench_qmatmul(c: &mut Criterion) {
    let mut grp = c.benchmark_group("qmatmul");
    grp.sample_size(10);
    if quick() {
        grp.measurement_time(Duration::from_millis(500)).warm_up_time(Duration::from_millis(200));
    }
    let (n, k) = (4096usize, 4096usize);
    for &(bits, g) in &[(4u32, 32usize), (4, 128), (8, 32), (2, 32), (3, 32)] {
        let layout = QuantLayout::new(n, k, bits, g).unwrap();
        let groups = k / g;
        let codes = random_codes(n * k, bits, 1);
        let mut p = vec![0u8; layout.packed_len()];
        pack(&codes, n, k, bits, &mut p).unwrap();
        let s: Vec<u16> =
            random_f32(n * groups, 2).iter().map(|v| half::f16::from_f32(v.abs() * 0.01).to_bits()).collect();
        let o: Vec<u16> = random_f32(n * groups, 3).iter().map(|v| half::f16::from_f32(*v * 0.1).to_bits()).collect();
        let bytes = layout.packed_len() + 4 * n * groups;
        grp.throughput(Throughput::Bytes(bytes as u64));
        let tiled_weight = if tiled::supported(&layout, true) {
            let mut t = vec![0u8; tiled::tiled_len(&layout)];
            tiled::repack(&p, &s, &o, layout, &mut t).unwrap();
            Some(t)
        } else {
            None
        };
        for &m in &[1usize, 8, 16] {
            let x = random_f32(m * k, 4);
            let mut y = vec![0f32; m * n];
            for isa in Isa::available() {
                if isa == Isa::Scalar && (m > 1 || quick()) {
                    continue; // the twin is slow; one point shows the gap
                }
                // Avx512Bf16 runs the same small-M code as Avx512Vnni: no separate points.
                if isa == Isa::Avx512Bf16 {
                    continue;
                }
                let params = GroupParams::F16 { scales: &s, offsets: &o };
                let id = BenchmarkId::new(format!("{isa:?}/b{bits}g{g}"), format!("M{m}"));
                grp.bench_function(id, |b| {
                    b.iter(|| qmatmul_with(black_box(&x), m, &p, params, layout, &mut y, isa).unwrap())
                });
                if int8::supported(&layout) {
                    let id = BenchmarkId::new(format!("int8-{isa:?}/b{bits}g{g}"), format!("M{m}"));
                    grp.bench_function(id, |b| {
                        b.iter(|| int8::qmatmul_int8_with(black_box(&x), m, &p, params, layout, &mut y, isa).unwrap())
                    });
                }
                if bf16::supported(&layout) {
                    let id = BenchmarkId::new(format!("bf16-{isa:?}/b{bits}g{g}"), format!("M{m}"));
                    grp.bench_function(id, |b| {
                        b.iter(|| bf16::qmatmul_bf16_with(black_box(&x), m, &p, params, layout, &mut y, isa).unwrap())
                    });
                }
                if let Some(t) = &tiled_weight {
                    let id = BenchmarkId::new(format!("tiled-{isa:?}/b{bits}g{g}"), format!("M{m}"));
                    grp.bench_function(id, |b| {
                        b.iter(|| tiled::qmatmul_tiled_with(black_box(&x), m, t, layout, &mut y, isa).unwrap())
                    });
                }
            }
        }
    }
    grp.finish();
}

fn bench_ops(c: &mut Criterion) {
    let mut grp = c.benchmark_group("ops");
    grp.sample_size(10);
    if quick() {
        grp.measurement_time(Duration::from_millis(500)).warm_up_time(Duration::from_millis(200));
    }
    let (n, k, g) = (4096usize, 4096usize, 32usize);
    let layout = QuantLayout::new(n, k, 4, g).unwrap();
    let codes = random_codes(n * k, 4, 5);
    let mut p = vec![0u8; layout.packed_len()];
    grp.throughput(Throughput::Bytes((n * k + layout.packed_len()) as u64));
    grp.bench_function("pack4", |b| b.iter(|| pack(black_box(&codes), n, k, 4, &mut p).unwrap()));
    let mut back = vec![0u8; n * k];
    grp.bench_function("unpack4", |b| b.iter(|| unpack(black_box(&p), n, k, 4, &mut back).unwrap()));
    let w = random_f32(n * k, 6);
    let (mut s, mut o) = (vec![0f32; n * k / g], vec![0f32; n * k / g]);
    grp.throughput(Throughput::Bytes((4 * n * k) as u64));
    grp.bench_function("quantize4", |b| {
        b.iter(|| quantize(black_box(&w), layout, ParamDtype::F16, &mut p, &mut s, &mut o).unwrap())
    });
    let mut wq = vec![0f32; n * k];
    grp.bench_function("dequantize4", |b| b.iter(|| dequantize(black_box(&p), &s, &o, layout, &mut wq).unwrap()));
    let mut pooled = vec![0f32; n * k / g];
    grp.bench_function("group_pool", |b| b.iter(|| group_pool(black_box(&w), k, g, &mut pooled).unwrap()));
    grp.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default();
    targets = bench_qmatmul, bench_ops
}
criterion_main!(benches);
