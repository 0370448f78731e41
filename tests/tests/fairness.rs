//! Fairness under load: one tenant saturating its volume (fio, nbd engine,
//! 64 KiB writes at queue depth 32, as fast as the server takes them) while
//! held to its I/O limit (4 MiB/s, set through the admin API) must not push
//! another tenant's 4 KiB latency p99 (fio at a steady 200 reads and 200
//! writes per second, queue depth 1) above twice its value with the server
//! otherwise idle, or, where twice is less than that, by more than
//! [`FLOOR_US`]. The same load with the limit lifted is measured and
//! printed, not asserted: it shows what the limit buys.
//!
//! Why a floor: once reads of recent writes came from the page cache (the
//! writeback change of 2026-12-02), the quiet tenant's idle p99 fell to 130
//! to 170 µs, and a held round added 100 to 200 µs to it, in debug and
//! release builds alike: about what it takes on two cores for the other core
//! to be busy with the held tenant's client or a hand-over when a quiet
//! request arrives. So the ratio hovered at 2 (1.57 to 2.16), deciding
//! nothing about the server, while the limit lifted still costs
//! milliseconds (7 to 21 ms p99 in the same runs).
//!
//! The noisy tenant writes sequentially, each round into a region of its
//! volume no earlier round wrote: overwrites make compaction work on the
//! store's own thread, which its limit does not cover yet (docs/OPERATIONS.md,
//! "Limits"). (Rounds that rewrote one region had the store compact about
//! 28 MiB of the noisy volume during a later held phase.)
//!
//! The comparison is made five times, an idle phase and a held phase each,
//! and the median of the five ratios is asserted: on a 2-core machine that
//! also runs other work, a burst of outside latency lands in one phase of
//! one round, while a fairness fault of the server lands in every held phase.
//! (With three rounds the same binary gave medians from 1.19 to 2.78 in one
//! sitting, a single bad round deciding the result.)
//!
//! One test in its own binary, so that no other test of the suite runs beside
//! it.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use blockseal_test_support::{require, temp_dir};
use blockseal_tests::{
    ServerProcess, StoreArg, cli_on_ok, configure_host, fio_clat_us, fio_iops, fio_json,
    tenants_with_disks,
};

/// Seconds of each measured phase of the quiet tenant.
const PHASE_SECS: u32 = 8;

/// Rounds of an idle and a held phase; odd, for a median.
const ROUNDS: usize = 5;

/// The rise of the quiet tenant's p99 (µs) always allowed, whatever its idle
/// value: below it a p99 on a 2-core machine measures the scheduler.
const FLOOR_US: f64 = 500.0;

/// The quiet tenant's phase: 4 KiB random reads and writes, 200 of each per
/// second, queue depth 1; its read and write p99 in microseconds.
fn quiet_phase(server: &ServerProcess) -> (f64, f64) {
    let report = fio_json(
        &server.dir,
        &server.uri("quiet/disk"),
        &[
            "--name=quiet",
            "--rw=randrw",
            "--rwmixread=50",
            "--bs=4k",
            "--iodepth=1",
            "--rate_iops=200",
            "--size=64M",
            "--ramp_time=1",
            "--time_based",
            &format!("--runtime={PHASE_SECS}"),
        ],
    );
    (
        fio_clat_us(&report, "read", "99.000000"),
        fio_clat_us(&report, "write", "99.000000"),
    )
}

/// MiB in each volume: room for a fresh region per round and the unlimited
/// run.
const VOLUME_MIB: usize = 1024;

/// MiB of the noisy volume each round writes into, from `(round - 1) *
/// REGION_MIB`: more than a held run writes at its limit (4 MiB/s for
/// `PHASE_SECS + 4` seconds), so it never wraps onto its own blocks.
const REGION_MIB: usize = 96;

/// The noisy tenant: fio writing 64 KiB blocks in order at queue depth 32
/// for a little longer than a quiet phase, as fast as it may, into the
/// `size_mib` MiB at `offset_mib` of its volume.
struct Noisy(Option<Child>);

impl Noisy {
    fn start(server: &ServerProcess, offset_mib: usize, size_mib: usize) -> Noisy {
        let child = Command::new("fio")
            .current_dir(&server.dir)
            .args([
                "--name=noisy",
                "--ioengine=nbd",
                &format!("--uri={}", server.uri("noisy/disk")),
                "--rw=write",
                "--bs=64k",
                "--iodepth=32",
                &format!("--offset={offset_mib}M"),
                &format!("--size={size_mib}M"),
                "--time_based",
                &format!("--runtime={}", PHASE_SECS + 4),
                "--output-format=json",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start fio");
        Noisy(Some(child))
    }

    /// Waits for fio to end; the MiB/s it wrote.
    fn finish(mut self) -> f64 {
        let out = self
            .0
            .take()
            .expect("running")
            .wait_with_output()
            .expect("fio");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "noisy fio failed: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let start = stdout.find('{').expect("fio's JSON report");
        let report: serde_json::Value = serde_json::from_str(&stdout[start..]).expect("fio's JSON");
        fio_iops(&report, "write") / 16.0
    }
}

impl Drop for Noisy {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[test]
fn a_tenant_at_its_limit_leaves_another_tenants_latency_alone() {
    require("fio");
    let tmp = temp_dir();
    let host = tmp.path().join("host");
    let config = configure_host(&host, None);
    let store = StoreArg::Config(&config);
    tenants_with_disks(store, &["noisy", "quiet"], &format!("{VOLUME_MIB}M"));
    let server = ServerProcess::with_config_and_log(&host, &config, "info");
    // fio's nbd engine attaches twice per run: once to learn the size, once
    // for the job itself; the n-th noisy run is under way at attach 2n.
    let attached = |run: usize| {
        server.wait_for_log(
            "export attached export=noisy/disk",
            2 * run,
            Duration::from_secs(30),
        )
    };

    // Held to its share: 4 MiB/s, a PBX tenant's 500 concurrent G.711
    // recordings, set online through the admin API.
    cli_on_ok(store, &["limits", "set", "noisy", "--bandwidth", "4M"]);
    let mut rounds = Vec::new();
    for round in 1..=ROUNDS {
        let idle = quiet_phase(&server);
        let noisy = Noisy::start(&server, (round - 1) * REGION_MIB, REGION_MIB);
        attached(round);
        let held = quiet_phase(&server);
        let held_mib = noisy.finish();
        eprintln!(
            "round {round}: quiet p99 read/write idle {:.0}/{:.0} µs, \
             noisy at {held_mib:.1} MiB/s {:.0}/{:.0} µs",
            idle.0, idle.1, held.0, held.1
        );
        assert!(
            held_mib <= 4.0 * 1.1,
            "the noisy tenant wrote {held_mib:.1} MiB/s under a 4 MiB/s limit"
        );
        rounds.push((idle, held));
    }
    let read_ratio = median(rounds.iter().map(|(idle, held)| held.0 / idle.0));
    let write_ratio = median(rounds.iter().map(|(idle, held)| held.1 / idle.1));
    let read_rise = median(rounds.iter().map(|(idle, held)| held.0 - idle.0));
    let write_rise = median(rounds.iter().map(|(idle, held)| held.1 - idle.1));
    let (idle_read, idle_write) = rounds[0].0;

    // Lifted: measured, not asserted.
    cli_on_ok(
        store,
        &["limits", "set", "noisy", "--bandwidth", "unlimited"],
    );
    let free_from = ROUNDS * REGION_MIB;
    let noisy = Noisy::start(&server, free_from, VOLUME_MIB - free_from);
    attached(ROUNDS + 1);
    let (free_read, free_write) = quiet_phase(&server);
    let free_mib = noisy.finish();

    eprintln!(
        "quiet tenant p99 (µs)            read   write\n\
         server idle (round 1)         {idle_read:>7.0} {idle_write:>7.0}\n\
         noisy unlimited ({free_mib:>5.0} MiB/s) {free_read:>7.0} {free_write:>7.0}\n\
         median ratio, noisy at 4 MiB/s to idle: read {read_ratio:.2}, write {write_ratio:.2}\n\
         median rise: read {read_rise:.0} µs, write {write_rise:.0} µs"
    );
    let fair = |ratio: f64, rise: f64| ratio <= 2.0 || rise <= FLOOR_US;
    assert!(
        fair(read_ratio, read_rise) && fair(write_ratio, write_rise),
        "with the noisy tenant at its limit the quiet tenant's p99 rose by a median \
         {read_ratio:.2}x, {read_rise:.0} µs (read) and {write_ratio:.2}x, {write_rise:.0} µs \
         (write) over {ROUNDS} rounds: more than 2x and more than {FLOOR_US} µs"
    );
}

/// The middle value of an odd number of values.
fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.collect();
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}
