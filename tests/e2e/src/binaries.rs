//! Where the release binaries under test are: `FEDSTEP_BIN_DIR` (set by
//! scripts/test.sh), else the target directory this test executable was
//! built into (`target/release/deps/<test>` → `target/release`).

use std::path::{Path, PathBuf};

pub struct Binaries {
    pub fedstep: PathBuf,
    pub client: PathBuf,
    pub lambda: PathBuf,
}

const HOW: &str =
    "build them with `cargo build --release -p fedstep -p fedstep-client -p fedstep-lambda` \
                   or point FEDSTEP_BIN_DIR at the directory holding them";

impl Binaries {
    /// Panics with a clear message when one is missing: a missing binary is
    /// a broken setup, never a reason to skip.
    pub fn find() -> Binaries {
        let dir = match std::env::var_os("FEDSTEP_BIN_DIR") {
            Some(d) => PathBuf::from(d),
            None => {
                let exe = std::env::current_exe().expect("the test executable's path");
                exe.parent()
                    .and_then(Path::parent)
                    .map(Path::to_path_buf)
                    .unwrap_or_else(|| panic!("cannot derive a target dir from {}", exe.display()))
            }
        };
        let get = |name: &str| {
            let p = dir.join(name);
            assert!(
                p.is_file(),
                "binary {name} not found at {}: {HOW}",
                p.display()
            );
            p
        };
        Binaries {
            fedstep: get("fedstep"),
            client: get("fedstep-client"),
            lambda: get("fedstep-lambda"),
        }
    }
}
