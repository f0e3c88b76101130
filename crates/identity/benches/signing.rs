//! CSR signing throughput of the mesh CA: parse and verify the CSR, build
//! the X.509-SVID from the authenticated identity, sign it (ECDSA P-256),
//! and assemble the chain — everything `CreateCertificate` does after
//! authenticating the caller.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use meshward_identity::ca::new_key_and_csr;
use meshward_identity::{CaFiles, CertificateAuthority, SpiffeId};

fn signing(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let ca =
        CertificateAuthority::load_or_create(&CaFiles::new(dir.path()), "cluster.local").unwrap();
    let id = SpiffeId::istio("cluster.local", "bench", "workload").unwrap();
    let (_key, csr) = new_key_and_csr(&id).unwrap();
    let mut group = c.benchmark_group("ca");
    group.measurement_time(Duration::from_secs(5));
    group.throughput(Throughput::Elements(1));
    group.bench_function("sign_csr", |b| {
        b.iter(|| black_box(ca.sign_csr(black_box(&csr), &id, None).unwrap()))
    });
    group.bench_function("new_key_and_csr", |b| {
        b.iter(|| black_box(new_key_and_csr(&id).unwrap()))
    });
    group.finish();
}

criterion_group!(benches, signing);
criterion_main!(benches);
