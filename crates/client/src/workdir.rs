//! The client's work directory: private to the user the client runs as.
//! It holds each round's global model and the local update between
//! training and upload; another local user who could read it would see
//! the model trained on this site's data, and one who could write it could
//! swap the update before it is uploaded.

use std::io::{Error, ErrorKind};
use std::path::Path;

use crate::error::ClientError;

/// Creates `dir` (and missing parents) readable only by this user, or
/// checks an existing one: refused if another user owns it or it is a
/// shared directory such as /tmp; group or other permissions on a
/// directory of our own are taken away.
#[allow(unsafe_code)] // libc::geteuid: who owns the directory
pub fn prepare(dir: &Path) -> Result<(), ClientError> {
    let io = |source: Error| ClientError::Io {
        path: dir.to_path_buf(),
        source,
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io)?;
        let meta = std::fs::metadata(dir).map_err(io)?;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let me = unsafe { libc::geteuid() };
        if meta.uid() != me {
            return Err(io(Error::new(
                ErrorKind::PermissionDenied,
                format!(
                    "the work directory is owned by uid {}, not by this user (uid {me}): \
                     another user could read or replace the models in it; use a directory of your own",
                    meta.uid()
                ),
            )));
        }
        if meta.mode() & 0o1000 != 0 {
            // /tmp and the like: shared by design, never ours to close.
            return Err(io(Error::new(
                ErrorKind::PermissionDenied,
                "the work directory is a shared one (sticky bit, like /tmp): \
                 use a directory of your own inside it",
            )));
        }
        if meta.mode() & 0o077 != 0 {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
        }
    }
    #[cfg(not(unix))]
    std::fs::create_dir_all(dir).map_err(io)?;
    Ok(())
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn a_new_directory_is_private() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("a/b");
        prepare(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
    }

    #[test]
    fn an_open_directory_of_ours_is_closed() {
        let base = tempfile::tempdir().unwrap();
        std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        prepare(base.path()).unwrap();
        assert_eq!(mode(base.path()), 0o700);
    }

    #[test]
    fn a_shared_directory_is_refused_and_left_as_it_is() {
        let base = tempfile::tempdir().unwrap();
        std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
        let msg = prepare(base.path()).unwrap_err().to_string();
        assert!(msg.contains("shared"), "{msg}");
        assert_eq!(mode(base.path()), 0o777);
    }

    #[test]
    #[allow(unsafe_code)] // libc::geteuid: are we root
    fn a_directory_of_another_user_is_refused_and_left_as_it_is() {
        let base = tempfile::tempdir().unwrap();
        // SAFETY: geteuid has no preconditions.
        let dir = if unsafe { libc::geteuid() } == 0 {
            // As root (CI containers): give a directory away to `nobody`.
            let dir = base.path().join("theirs");
            std::fs::create_dir(&dir).unwrap();
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
            std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
            dir
        } else {
            // Otherwise the temp dir's parent is root's.
            base.path().parent().unwrap().to_path_buf()
        };
        let before = mode(&dir);
        let msg = prepare(&dir).unwrap_err().to_string();
        assert!(msg.contains("not by this user"), "{msg}");
        assert_eq!(mode(&dir), before, "refused means untouched");
    }
}
/// Makes `file` (in a round's scratch directory) the kept `target`, a file
/// that outlives the round (FedSelect's personal values, SCAFFOLD's c_i):
/// copied to a temporary name beside `target`, then renamed, so the kept
/// file is whole or absent, never half-written.
pub fn keep_file(file: &Path, target: &Path) -> Result<(), ClientError> {
    let dir = target.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(ClientError::io(dir))?;
    let name = target.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::copy(file, &tmp).map_err(ClientError::io(&tmp))?;
    std::fs::rename(&tmp, target).map_err(ClientError::io(target))?;
    Ok(())
}
