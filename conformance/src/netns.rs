//! Network namespaces made with iproute2, and running code inside them.
//!
//! Code runs in a namespace on a thread of its own that enters it with `setns(2)`
//! (`Netns::run`, `Netns::spawn`): namespaces are per thread, so the rest of the process is
//! untouched. Every namespace is deleted when its handle drops.

use std::fs::File;
use std::io;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use nix::sched::{CloneFlags, setns};

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("`{command}` failed: {message}")]
    Command { command: String, message: String },
    #[error("entering network namespace {name}: {source}")]
    Enter { name: String, source: io::Error },
}

/// Runs a command (in the current network namespace) and fails with its stderr.
pub fn run(program: &str, args: &[&str]) -> Result<String, NetnsError> {
    let out = Command::new(program).args(args).output().map_err(|e| NetnsError::Command {
        command: format!("{program} {}", args.join(" ")),
        message: format!("cannot run {program}: {e} (is it installed? scripts/setup.sh installs it)"),
    })?;
    if !out.status.success() {
        return Err(NetnsError::Command {
            command: format!("{program} {}", args.join(" ")),
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call, at most `15 - prefix.len()` characters added.
pub fn unique(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{}x{n}", std::process::id() % 100_000)
}

/// A network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `name` (fails if it exists), with loopback up.
    pub fn create(name: &str) -> Result<Netns, NetnsError> {
        run("ip", &["netns", "add", name])?;
        let ns = Netns { name: name.to_string() };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n NAME ARGS...`
    pub fn ip(&self, args: &[&str]) -> Result<String, NetnsError> {
        let mut a = vec!["-n", &self.name];
        a.extend_from_slice(args);
        run("ip", &a)
    }

    /// Any command, inside the namespace (`ip netns exec`).
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String, NetnsError> {
        let mut a = vec!["netns", "exec", &self.name, program];
        a.extend_from_slice(args);
        run("ip", &a)
    }

    pub fn sysctl(&self, key: &str, value: &str) -> Result<(), NetnsError> {
        self.exec("sysctl", &["-qw", &format!("{key}={value}")]).map(|_| ())
    }

    /// Enters this namespace on the current thread (for threads made to live in it).
    pub fn enter(&self) -> Result<(), NetnsError> {
        let f = File::open(format!("/run/netns/{}", self.name)).map_err(|source| NetnsError::Enter { name: self.name.clone(), source })?;
        setns(&f, CloneFlags::CLONE_NEWNET).map_err(|e| NetnsError::Enter { name: self.name.clone(), source: io::Error::from(e) })
    }

    /// Runs `f` in this namespace, on a thread of its own, and returns what it returns.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T, NetnsError> {
        self.handle().run(f)
    }

    /// Starts `f` in this namespace on a new thread.
    pub fn spawn<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<std::thread::JoinHandle<T>, NetnsError> {
        self.handle().spawn(f)
    }

    /// A handle that names this namespace without owning it (it can be sent to threads).
    pub fn handle(&self) -> NetnsHandle {
        NetnsHandle { name: self.name.clone() }
    }
}

/// Names a namespace someone else owns; valid while the owner lives.
#[derive(Debug, Clone)]
pub struct NetnsHandle {
    name: String,
}

impl NetnsHandle {
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T, NetnsError> {
        let h = self.spawn(f)?;
        Ok(h.join().expect("thread in network namespace panicked"))
    }

    pub fn spawn<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<std::thread::JoinHandle<T>, NetnsError> {
        let file =
            File::open(format!("/run/netns/{}", self.name)).map_err(|source| NetnsError::Enter { name: self.name.clone(), source })?;
        let name = self.name.clone();
        Ok(std::thread::spawn(move || {
            setns(&file, CloneFlags::CLONE_NEWNET).unwrap_or_else(|e| panic!("entering network namespace {name}: {e}"));
            f()
        }))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.name]);
    }
}
