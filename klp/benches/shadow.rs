//! Shadow-variable store benchmark: `get`, `alloc` and `free` at 10^3 and 10^6 live
//! variables, on 1 and 2 threads, against two baselines measured in the same run:
//!
//! * `hashmap`: a plain single-threaded `std::collections::HashMap<(usize, u64),
//!   Box<[u8]>>` with its default hasher (the floor). Shared read-only for 2-thread gets.
//! * `kernel`: a model of the kernel's design: 4096 fixed buckets chosen by `hash_ptr(obj)`,
//!   singly linked chains, lookups walking the chain without a lock (as under RCU), and
//!   one global lock for writers, which also walk the chain; freed nodes are released
//!   later, outside the timed section (as `kfree_rcu` does).
//! * `klp`: our [`ShadowStore`], reads under one [`klp::shadow::Guard`] per batch.
//!
//! Every `get` also reads the 8 data bytes, as a caller would. Throughput is total
//! operations over a fixed batch per thread divided by wall time. Run with
//! `cargo bench -p klp --bench shadow`; see BENCHMARKS.md for the results.

use std::collections::HashMap;
use std::hint::black_box;
use std::ptr;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::{Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use klp::shadow::ShadowStore;

const ID: u64 = 1;
const SIZES: [usize; 2] = [1_000, 1_000_000];
const DATA: usize = 8;

fn obj(i: usize) -> usize {
    0xffff_8880_0000_0000_usize.wrapping_add(i * 64)
}

/// A deterministic permutation of `0..n` (xorshift Fisher–Yates).
fn shuffled(n: usize) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    let mut x = 0x9E37_79B9_7F4A_7C15_u64;
    for i in (1..n).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
    v
}

// ---- the kernel model ----

const KBITS: u32 = 12;

struct KNode {
    next: AtomicPtr<KNode>,
    obj: usize,
    id: u64,
    data: [u8; DATA],
}

/// # Invariants
///
/// 1. Every non-null pointer reachable from `buckets` is a live `Box<KNode>` leaked with
///    `Box::into_raw`; unlinked nodes go to `graveyard` and are freed only by
///    `drain_graveyard` (outside readers) or on drop.
/// 2. Links change only under `lock`, with release stores of fully initialised nodes.
struct KernelModel {
    buckets: Box<[AtomicPtr<KNode>]>,
    lock: Mutex<()>,
    graveyard: Mutex<Vec<*mut KNode>>,
}

// SAFETY: the raw pointers are owned boxes managed under the invariants above; KNode
// holds only plain data and atomics.
unsafe impl Sync for KernelModel {}
// SAFETY: as above.
unsafe impl Send for KernelModel {}

fn hash_ptr(obj: usize) -> usize {
    ((obj as u64).wrapping_mul(0x61C8_8646_80B5_83EB) >> (64 - KBITS)) as usize
}

impl KernelModel {
    fn new() -> Self {
        KernelModel {
            buckets: (0..1 << KBITS)
                .map(|_| AtomicPtr::new(ptr::null_mut()))
                .collect(),
            lock: Mutex::new(()),
            graveyard: Mutex::new(Vec::new()),
        }
    }

    /// `klp_shadow_get`: lock-free chain walk.
    fn get(&self, obj: usize, id: u64) -> Option<&[u8; DATA]> {
        let mut n = self.buckets[hash_ptr(obj)].load(Ordering::Acquire);
        // SAFETY: reachable nodes are live (invariant 1); nodes are only freed by
        // `drain_graveyard`, which the benchmark never runs during gets.
        while let Some(node) = unsafe { n.as_ref() } {
            if node.obj == obj && node.id == id {
                return Some(&node.data);
            }
            n = node.next.load(Ordering::Acquire);
        }
        None
    }

    /// Links a node at the bucket head (no duplicate check: prefill only).
    fn push(&self, obj: usize, id: u64) {
        let bucket = &self.buckets[hash_ptr(obj)];
        let node = Box::into_raw(Box::new(KNode {
            next: AtomicPtr::new(bucket.load(Ordering::Relaxed)),
            obj,
            id,
            data: (obj as u64).to_ne_bytes(),
        }));
        bucket.store(node, Ordering::Release);
    }

    /// `klp_shadow_alloc`: lock-free lookup, zeroed allocation outside the lock, lookup
    /// again under the lock, publish.
    fn alloc(&self, obj: usize, id: u64) -> bool {
        if self.get(obj, id).is_some() {
            return false;
        }
        let node = Box::new(KNode {
            next: AtomicPtr::new(ptr::null_mut()),
            obj,
            id,
            data: [0; DATA],
        });
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        if self.get(obj, id).is_some() {
            return false;
        }
        let bucket = &self.buckets[hash_ptr(obj)];
        node.next
            .store(bucket.load(Ordering::Relaxed), Ordering::Relaxed);
        bucket.store(Box::into_raw(node), Ordering::Release);
        true
    }

    /// `klp_shadow_free`: under the lock, walk the chain, unlink, defer the free.
    fn free(&self, obj: usize, id: u64) -> bool {
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut link = &self.buckets[hash_ptr(obj)];
        loop {
            let n = link.load(Ordering::Relaxed);
            // SAFETY: reachable nodes are live (invariant 1) and we hold the lock.
            let Some(node) = (unsafe { n.as_ref() }) else {
                return false;
            };
            if node.obj == obj && node.id == id {
                link.store(node.next.load(Ordering::Relaxed), Ordering::Release);
                self.graveyard
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(n);
                return true;
            }
            link = &node.next;
        }
    }

    /// Frees unlinked nodes (the grace period has passed: no reader runs).
    fn drain_graveyard(&self) {
        for n in self
            .graveyard
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            // SAFETY: `n` was unlinked under the lock and leaked from a Box (invariant
            // 1); no reader runs now, and each node enters the graveyard once.
            drop(unsafe { Box::from_raw(n) });
        }
    }
}

impl Drop for KernelModel {
    fn drop(&mut self) {
        self.drain_graveyard();
        for b in self.buckets.iter() {
            let mut n = b.load(Ordering::Relaxed);
            while !n.is_null() {
                // SAFETY: `&mut self`: the reachable boxes are ours alone (invariant 1),
                // each freed once after reading its link.
                let node = unsafe { Box::from_raw(n) };
                n = node.next.load(Ordering::Relaxed);
            }
        }
    }
}

// ---- the contenders ----

struct Fixture {
    n: usize,
    order: Vec<usize>,
    klp: ShadowStore,
    map: HashMap<(usize, u64), Box<[u8]>>,
    kernel: KernelModel,
}

fn fixture(n: usize) -> Fixture {
    let klp = ShadowStore::new();
    let mut map = HashMap::new();
    let kernel = KernelModel::new();
    for i in 0..n {
        let o = obj(i);
        klp.alloc_with(o, ID, DATA, |o, d| {
            d.copy_from_slice(&(o as u64).to_ne_bytes());
            Ok(())
        })
        .expect("prefill");
        map.insert(
            (o, ID),
            (o as u64).to_ne_bytes().to_vec().into_boxed_slice(),
        );
        kernel.push(o, ID);
    }
    Fixture {
        n,
        order: shuffled(n),
        klp,
        map,
        kernel,
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Impl {
    Klp,
    HashMap,
    Kernel,
}

impl Impl {
    fn name(self) -> &'static str {
        match self {
            Impl::Klp => "klp",
            Impl::HashMap => "hashmap",
            Impl::Kernel => "kernel",
        }
    }
}

fn read8(b: &[u8]) -> u64 {
    u64::from_ne_bytes(b[..8].try_into().unwrap_or([0; 8]))
}

/// Runs `batch` gets `iters` times on this thread, starting at `start` in the order.
fn get_loop(f: &Fixture, imp: Impl, iters: u64, batch: usize, start: usize) -> u64 {
    let mut sum = 0u64;
    let mut pos = start;
    let len = f.order.len();
    match imp {
        Impl::Klp => {
            let g = f.klp.pin();
            for _ in 0..iters {
                for _ in 0..batch {
                    let o = obj(f.order[pos]);
                    pos = if pos + 1 == len { 0 } else { pos + 1 };
                    if let Some(b) = g.get(o, ID).and_then(|r| r.bytes()) {
                        sum = sum.wrapping_add(read8(b));
                    }
                }
            }
        }
        Impl::HashMap => {
            for _ in 0..iters {
                for _ in 0..batch {
                    let o = obj(f.order[pos]);
                    pos = if pos + 1 == len { 0 } else { pos + 1 };
                    if let Some(b) = f.map.get(&(o, ID)) {
                        sum = sum.wrapping_add(read8(b));
                    }
                }
            }
        }
        Impl::Kernel => {
            for _ in 0..iters {
                for _ in 0..batch {
                    let o = obj(f.order[pos]);
                    pos = if pos + 1 == len { 0 } else { pos + 1 };
                    if let Some(b) = f.kernel.get(o, ID) {
                        sum = sum.wrapping_add(read8(b));
                    }
                }
            }
        }
    }
    sum
}

/// On-CPU time of the calling thread in ns (Linux `schedstat`), if available.
fn thread_cpu_ns() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    s.split_whitespace().next()?.parse().ok()
}

/// Wall time of `threads` threads each running `work(thread)` after a common start, and
/// the CPU time they used together (0 if unknown).
fn parallel(threads: usize, work: &(dyn Fn(usize) -> u64 + Sync)) -> (Duration, u64) {
    let timed = |t: usize| {
        let c0 = thread_cpu_ns();
        black_box(work(t));
        let end = Instant::now();
        let cpu = match (c0, thread_cpu_ns()) {
            (Some(a), Some(b)) => b.saturating_sub(a),
            _ => 0,
        };
        (end, cpu)
    };
    if threads == 1 {
        let t0 = Instant::now();
        let (end, cpu) = timed(0);
        return (end.duration_since(t0), cpu);
    }
    let barrier = Barrier::new(threads + 1);
    thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (barrier, timed) = (&barrier, &timed);
                s.spawn(move || {
                    barrier.wait();
                    timed(t)
                })
            })
            .collect();
        barrier.wait();
        let t0 = Instant::now();
        let mut end = t0;
        let mut cpu = 0;
        for h in handles {
            let (e, c) = h.join().unwrap_or_else(|_| (Instant::now(), 0));
            end = end.max(e);
            cpu += c;
        }
        (end.duration_since(t0), cpu)
    })
}

/// Operations and CPU ns per benchmark, for the CPU-normalised scaling summary.
static CPU: Mutex<Vec<(String, u64, u64)>> = Mutex::new(Vec::new());

fn record_cpu(name: &str, ops: u64, cpu: u64) {
    let mut v = CPU.lock().unwrap_or_else(|e| e.into_inner());
    match v.iter_mut().find(|(n, _, _)| n == name) {
        Some(e) => {
            e.1 += ops;
            e.2 += cpu;
        }
        None => v.push((name.to_string(), ops, cpu)),
    }
}

/// Prints, for each 1-thread/2-thread pair, the CPU time per operation and the scaling a
/// machine with two otherwise idle cores would show if only CPU time counted:
/// `2 × cpu_per_op(1t) ÷ cpu_per_op(2t)`. Contention between the threads (shared cache
/// lines, locks) raises the 2-thread CPU cost and shows here; time stolen by other
/// processes on a shared machine does not.
fn print_cpu_summary() {
    let v = CPU.lock().unwrap_or_else(|e| e.into_inner());
    let per_op = |name: &str| {
        v.iter()
            .find(|(n, ops, cpu)| n == name && *ops > 0 && *cpu > 0)
            .map(|(_, ops, cpu)| *cpu as f64 / *ops as f64)
    };
    for (name, _, _) in v.iter().filter(|(n, _, _)| n.contains("/1t/")) {
        let two = name.replace("/1t/", "/2t/");
        if let (Some(a), Some(b)) = (per_op(name), per_op(&two)) {
            println!(
                "cpu-normalised {name}: 1t {a:.1} ns cpu/op, 2t {b:.1} ns cpu/op, 2t/1t {:.2}",
                2.0 * a / b
            );
        }
    }
}

/// A pure-ALU loop with no memory traffic: how well this machine runs 2 threads at
/// all, measured in the same run as the gets (on a shared or oversubscribed machine this
/// is well below 2).
fn spin_loop(iters: u64, batch: usize) -> u64 {
    let mut x = 1u64;
    for i in 0..iters * batch as u64 {
        x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(i);
    }
    x
}

fn bench_control(c: &mut Criterion) {
    let mut group = c.benchmark_group("shadow_get_control");
    let batch = 4096;
    for threads in [1usize, 2] {
        group.throughput(Throughput::Elements((batch * threads) as u64));
        let id = BenchmarkId::new(format!("spin/{threads}t"), 0);
        let name = format!("control/{threads}t/0");
        group.bench_function(id, |b| {
            b.iter_custom(|iters| {
                let (wall, cpu) = parallel(threads, &|_| spin_loop(iters, batch));
                record_cpu(&name, iters * (batch * threads) as u64, cpu);
                wall
            })
        });
    }
    group.finish();
}

fn bench_get(c: &mut Criterion, fixtures: &[Fixture]) {
    bench_control(c);
    let mut group = c.benchmark_group("shadow_get");
    for f in fixtures {
        for imp in [Impl::Klp, Impl::HashMap, Impl::Kernel] {
            // The kernel model walks ~n/4096 nodes per lookup: smaller batches.
            let batch = if imp == Impl::Kernel && f.n > 10_000 {
                128
            } else {
                4096
            };
            for threads in [1usize, 2] {
                group.throughput(Throughput::Elements((batch * threads) as u64));
                let id = BenchmarkId::new(format!("{}/{}t", imp.name(), threads), f.n);
                let name = format!("get/{}/{}t/{}", imp.name(), threads, f.n);
                group.bench_function(id, |b| {
                    b.iter_custom(|iters| {
                        let (wall, cpu) = parallel(threads, &|t| {
                            get_loop(f, imp, iters, batch, t * f.order.len() / 2)
                        });
                        record_cpu(&name, iters * (batch * threads) as u64, cpu);
                        wall
                    })
                });
            }
        }
    }
    group.finish();
}

/// Keys for the alloc/free batches, beyond the prefilled ones, distinct per thread.
fn extra_obj(f: &Fixture, t: usize, j: usize) -> usize {
    obj(f.n + t * 1_000_000 + j)
}

/// `iters` rounds on one thread: time `batch` allocs (or frees) of fresh keys, and do
/// the matching frees (or allocs) untimed, so the store stays at `n` variables.
/// Returns the timed wall time and the CPU time of the timed phases (0 if unknown).
fn churn(
    f: &Fixture,
    imp: Impl,
    iters: u64,
    batch: usize,
    t: usize,
    time_alloc: bool,
) -> (Duration, u64) {
    let mut timed = Duration::ZERO;
    let mut cpu = 0u64;
    let mut cpu_from = 0u64;
    let now_cpu = || thread_cpu_ns().unwrap_or(0);
    let alloc = |j: usize| {
        let o = extra_obj(f, t, j);
        match imp {
            Impl::Klp => f.klp.alloc(o, ID, DATA).is_ok(),
            Impl::Kernel => f.kernel.alloc(o, ID),
            // Measured by `churn_hashmap`, which needs `&mut`.
            Impl::HashMap => false,
        }
    };
    let free = |j: usize| {
        let o = extra_obj(f, t, j);
        match imp {
            Impl::Klp => f.klp.free(o, ID),
            Impl::Kernel => f.kernel.free(o, ID),
            // Measured by `churn_hashmap`, which needs `&mut`.
            Impl::HashMap => false,
        }
    };
    for _ in 0..iters {
        if time_alloc {
            cpu_from = now_cpu();
        }
        let t0 = Instant::now();
        for j in 0..batch {
            black_box(if time_alloc { alloc(j) } else { free(j) });
        }
        if time_alloc {
            timed += t0.elapsed();
            cpu += now_cpu().saturating_sub(cpu_from);
        } else {
            cpu_from = now_cpu();
        }
        let t1 = Instant::now();
        for j in 0..batch {
            black_box(if time_alloc { free(j) } else { alloc(j) });
        }
        if !time_alloc {
            timed += t1.elapsed();
            cpu += now_cpu().saturating_sub(cpu_from);
        }
        if imp == Impl::Kernel {
            f.kernel.drain_graveyard();
        }
    }
    (timed, cpu)
}

fn churn_hashmap(
    map: &mut HashMap<(usize, u64), Box<[u8]>>,
    base: usize,
    iters: u64,
    batch: usize,
    time_alloc: bool,
) -> Duration {
    let mut timed = Duration::ZERO;
    for _ in 0..iters {
        let t0 = Instant::now();
        for j in 0..batch {
            let k = (obj(base + j), ID);
            if time_alloc {
                black_box(map.insert(k, vec![0u8; DATA].into_boxed_slice()));
            } else {
                black_box(map.remove(&k));
            }
        }
        let first = t0.elapsed();
        let t1 = Instant::now();
        for j in 0..batch {
            let k = (obj(base + j), ID);
            if time_alloc {
                black_box(map.remove(&k));
            } else {
                black_box(map.insert(k, vec![0u8; DATA].into_boxed_slice()));
            }
        }
        timed += if time_alloc { first } else { t1.elapsed() };
    }
    timed
}

fn bench_churn(c: &mut Criterion, fixtures: &mut [Fixture], time_alloc: bool) {
    let name = if time_alloc {
        "shadow_alloc"
    } else {
        "shadow_free"
    };
    let mut group = c.benchmark_group(name);
    for f in fixtures.iter_mut() {
        for imp in [Impl::Klp, Impl::HashMap, Impl::Kernel] {
            let batch = if imp == Impl::Kernel && f.n > 10_000 {
                64
            } else {
                1024
            };
            let thread_counts: &[usize] = if imp == Impl::Klp { &[1, 2] } else { &[1] };
            for &threads in thread_counts {
                group.throughput(Throughput::Elements((batch * threads) as u64));
                let id = BenchmarkId::new(format!("{}/{}t", imp.name(), threads), f.n);
                if imp == Impl::HashMap {
                    let base = f.n;
                    let map = &mut f.map;
                    group.bench_function(id, |b| {
                        b.iter_custom(|iters| churn_hashmap(map, base, iters, batch, time_alloc))
                    });
                    continue;
                }
                let f = &*f;
                let name = format!("{name}/{}/{}t/{}", imp.name(), threads, f.n);
                group.bench_function(id, |b| {
                    b.iter_custom(|iters| {
                        let ops = iters * (batch * threads) as u64;
                        if threads == 1 {
                            let (wall, cpu) = churn(f, imp, iters, batch, 0, time_alloc);
                            record_cpu(&name, ops, cpu);
                            return wall;
                        }
                        // Each thread times its own share; the slowest one is the wall
                        // time for all `threads * batch` operations of an iteration.
                        let times = Mutex::new(Vec::new());
                        let _ = parallel(threads, &|t| {
                            let d = churn(f, imp, iters, batch, t, time_alloc);
                            times.lock().unwrap_or_else(|e| e.into_inner()).push(d);
                            0
                        });
                        let times = times.into_inner().unwrap_or_else(|e| e.into_inner());
                        record_cpu(&name, ops, times.iter().map(|t| t.1).sum());
                        times.into_iter().map(|t| t.0).max().unwrap_or_default()
                    })
                });
            }
        }
    }
    group.finish();
}

fn benches(c: &mut Criterion) {
    let mut fixtures: Vec<Fixture> = SIZES.iter().map(|&n| fixture(n)).collect();
    for f in &fixtures {
        assert_eq!(f.klp.len(), f.n);
    }
    bench_get(c, &fixtures);
    bench_churn(c, &mut fixtures, true);
    bench_churn(c, &mut fixtures, false);
    print_cpu_summary();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(1500))
}

criterion_group! {
    name = shadow;
    config = config();
    targets = benches
}
criterion_main!(shadow);
