//! Takeover: two release `cachetail run` processes on one database, the standby observed through
//! its `/v1/status` as the active one is killed (kill -9) or paused (SIGSTOP).

use std::path::PathBuf;
use std::time::Duration;

use super::daemons::{DaemonProcess, free_port};
use super::{BenchOptions, DELETE_RULE, Row, Spread, fresh_catalog, runs_text};
use crate::demo::Rng;

/// How often a standby looks at the lease (`tail::STANDBY_POLL`): the baseline of a takeover
/// after kill -9, when nothing else wakes the standby.
const STANDBY_POLL: Duration = Duration::from_millis(200);

/// Two daemons on one database (A, B): configs written, nothing started.
struct Pair {
    configs: [(PathBuf, u16); 2],
}

impl Pair {
    fn new(options: &BenchOptions, name: &str, lease: &str) -> anyhow::Result<Pair> {
        let db_name = format!("{name}.db");
        fresh_catalog(&options.dir.join(&db_name), 1_000)?;
        let mut configs = Vec::new();
        for side in ["a", "b"] {
            let port = free_port()?;
            let path = options.dir.join(format!("{name}-{side}.toml"));
            std::fs::write(
                &path,
                format!(
                    "database = \"{db_name}\"\nlisten = \"127.0.0.1:{port}\"\n[tail]\nlease = \"{lease}\"\n\
                     [keys.\"book:{{id}}\"]\nquery = \"SELECT count(*) AS reviews FROM reviews WHERE book_id = :id\"\n{DELETE_RULE}"
                ),
            )?;
            configs.push((path, port));
        }
        let configs = <[_; 2]>::try_from(configs).map_err(|_| anyhow::anyhow!("two configs"))?;
        Ok(Pair { configs })
    }

    fn start(&self, options: &BenchOptions, side: usize) -> anyhow::Result<DaemonProcess> {
        let (config, port) = &self.configs[side];
        let name = format!("takeover-{}", ["a", "b"][side]);
        DaemonProcess::start(&options.dir, config, *port, &name)
    }

    /// A active, then B standing by.
    fn start_both(&self, options: &BenchOptions) -> anyhow::Result<[DaemonProcess; 2]> {
        let mut a = self.start(options, 0)?;
        a.wait_role("active", Duration::from_secs(30))?;
        let mut b = self.start(options, 1)?;
        b.wait_role("standby", Duration::from_secs(30))?;
        Ok([a, b])
    }
}

/// The lease in the kill -9 runs: long, so that only the process-gone check explains a fast
/// takeover.
const LEASE_LONG: Duration = Duration::from_secs(30);
/// The lease in the SIGSTOP runs: only its expiry frees the paused daemon's hold.
const LEASE: Duration = Duration::from_secs(2);

/// Release daemons, as deployed (memory backend; the lease does not depend on it): kill -9 of
/// the active one with a long lease (so only the process-gone check can explain a fast
/// takeover), and SIGSTOP of the active one (only the lease's expiry frees it).
pub(super) fn takeover(options: &BenchOptions) -> anyhow::Result<Vec<Row>> {
    let runs = if options.quick { 2 } else { 8 };
    let stop_runs = if options.quick { 1 } else { 5 };
    let mut rng = Rng::new(7);
    let killed = Spread::of(after_kill(options, runs, &mut rng)?);
    let stopped = Spread::of(after_stop(options, stop_runs, &mut rng)?);
    let poll_ms = STANDBY_POLL.as_secs_f64() * 1e3;
    let lease_ms = LEASE.as_secs_f64() * 1e3;
    eprintln!(
        "takeover after kill -9 (lease 30s): {} ms; after SIGSTOP (lease 2s): {} ms",
        killed.all(),
        stopped.all()
    );
    let build = if cfg!(debug_assertions) {
        "DEBUG build"
    } else {
        "release build"
    };
    Ok(vec![
        Row {
            figure: format!(
                "standby takeover after `kill -9` of the active daemon, two `cachetail run` processes ({build}) on one database, `lease = \"30s\"`, {}, observed through the standby's `/v1/status`",
                runs_text(runs)
            ),
            measured: killed.millis(),
            baseline: format!(
                "the standby polls the lease every {poll_ms:.0} ms (expected: {:.0} ms on average, at most {poll_ms:.0} ms); the lease, 30 s",
                poll_ms / 2.0
            ),
            ratio: format!(
                "median {:.2}× the poll interval, {:.3}× the lease",
                killed.median() / poll_ms,
                killed.median() / (LEASE_LONG.as_secs_f64() * 1e3)
            ),
            target: "at once: within one poll interval (+ a few ms)",
        },
        Row {
            figure: format!(
                "takeover from an active daemon paused (SIGSTOP), same pair, `lease = \"2s\"`, {}",
                runs_text(stop_runs)
            ),
            measured: stopped.millis(),
            baseline: format!(
                "the lease, {lease_ms:.0} ms (renewed each third of it, so expected between {:.0} and {:.0} ms)",
                lease_ms * 2.0 / 3.0,
                lease_ms + poll_ms
            ),
            ratio: format!("median {:.2}× the lease", stopped.median() / lease_ms),
            target: "≈ the lease",
        },
    ])
}

/// Takeover times (ms) after kill -9 of the active daemon, `runs` times, the two alternating.
fn after_kill(options: &BenchOptions, runs: usize, rng: &mut Rng) -> anyhow::Result<Vec<f64>> {
    let pair = Pair::new(options, "takeover-kill", "30s")?;
    let mut daemons = pair.start_both(options)?;
    let mut active = 0;
    let mut killed = Vec::new();
    for _ in 0..runs {
        let standby = 1 - active;
        daemons[active].kill();
        killed.push(
            daemons[standby]
                .wait_role("active", LEASE_LONG / 2)?
                .as_secs_f64()
                * 1e3,
        );
        // The killed one comes back as the standby, for the next run.
        daemons[active] = pair.start(options, active)?;
        daemons[active].wait_role("standby", Duration::from_secs(30))?;
        // Let the new standby settle into its polling rhythm: the next kill lands at a random
        // point of it.
        std::thread::sleep(STANDBY_POLL + Duration::from_millis(rng.pick(200).unsigned_abs()));
        active = standby;
    }
    Ok(killed)
}

/// Takeover times (ms) from an active daemon paused with SIGSTOP, `runs` times.
fn after_stop(options: &BenchOptions, runs: usize, rng: &mut Rng) -> anyhow::Result<Vec<f64>> {
    let pair = Pair::new(options, "takeover-stop", "2s")?;
    let mut daemons = pair.start_both(options)?;
    let mut active = 0;
    let mut stopped = Vec::new();
    for _ in 0..runs {
        let standby = 1 - active;
        // The active daemon renews each third of the lease: pause it at a random point of that
        // cycle (right after a takeover it has just renewed, which would always measure the
        // whole lease).
        let third = LEASE.as_millis() as u32 / 3;
        std::thread::sleep(
            Duration::from_millis(u64::from(third))
                + Duration::from_millis(rng.pick(third).unsigned_abs()),
        );
        daemons[active].signal("-STOP")?;
        stopped.push(
            daemons[standby]
                .wait_role("active", LEASE * 5)?
                .as_secs_f64()
                * 1e3,
        );
        // Resumed, it finds it lost the lease and stands by (applying nothing).
        daemons[active].signal("-CONT")?;
        daemons[active].wait_role("standby", LEASE * 5)?;
        active = standby;
    }
    Ok(stopped)
}
