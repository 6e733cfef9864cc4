//! A fault hook for tests (`TURBINE_FAULT_STALL_FILE=PATH`; off unless set): while the file
//! exists, the process's engine waits before each piece of work: an executor before each
//! step, an encoder before each image. Everything else in the process goes on (the actors
//! take requests and cancellations, load reports and the lease heartbeat keep running), so
//! the process looks exactly like one whose engine is stuck: alive to discovery, making no
//! progress. While it holds, `PATH.holding` exists, so a test can tell which process has the
//! work before it kills it. tests/migration.rs drives the frontend's liveness path with it,
//! tests/epd_e2e.rs an encoder killed mid-request; removing the file lets the engine go on.

use std::path::PathBuf;
use std::thread;
use std::time::Duration;

pub struct StallHook {
    path: PathBuf,
}

impl StallHook {
    pub fn from_env() -> Option<StallHook> {
        let path = std::env::var_os("TURBINE_FAULT_STALL_FILE")?;
        Some(StallHook { path: path.into() })
    }

    fn marker(&self) -> PathBuf {
        let mut name = self.path.clone().into_os_string();
        name.push(".holding");
        PathBuf::from(name)
    }

    /// Returns once the file is gone (at once when it is not there). Blocking: call it on
    /// the engine's own thread.
    pub fn hold(&self) {
        let mut held = false;
        while self.path.exists() {
            if !held {
                eprintln!("{} exists: holding", self.path.display());
                let _ = std::fs::write(self.marker(), b"");
                held = true;
            }
            thread::sleep(Duration::from_millis(20));
        }
        if held {
            let _ = std::fs::remove_file(self.marker());
            eprintln!("{} removed: going on", self.path.display());
        }
    }
}
