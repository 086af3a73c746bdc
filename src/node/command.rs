//! The one way the driver runs an external tool (mkfs, blkid): explicit argv, never a
//! shell; a timeout that kills the child; stderr carried into the error.

use std::ffi::OsStr;
use std::process::Stdio;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("{tool} is not installed on this node (install e2fsprogs, xfsprogs and util-linux)")]
    NotInstalled { tool: String },
    #[error("{tool} did not finish within {after:?} and was killed")]
    TimedOut { tool: String, after: Duration },
    #[error("{tool} exited with {status}: {stderr}")]
    Failed {
        tool: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("running {tool}: {source}")]
    Spawn {
        tool: String,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug)]
pub struct ToolOutput {
    pub status: std::process::ExitStatus,
    pub stdout: String,
}

#[derive(Debug, Clone)]
pub struct CommandRunner {
    timeout: Duration,
}

impl CommandRunner {
    pub fn new(timeout: Duration) -> Self {
        CommandRunner { timeout }
    }

    /// Runs `tool args…`; `ok_codes` lists exit codes that are answers, not failures
    /// (blkid exits 2 for "nothing found").
    pub async fn run<I, S>(
        &self,
        tool: &str,
        args: I,
        ok_codes: &[i32],
    ) -> Result<ToolOutput, ToolError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let child = tokio::process::Command::new(tool)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| match source.kind() {
                std::io::ErrorKind::NotFound => ToolError::NotInstalled { tool: tool.into() },
                _ => ToolError::Spawn {
                    tool: tool.into(),
                    source,
                },
            })?;
        let output = tokio::time::timeout(self.timeout, child.wait_with_output())
            .await
            .map_err(|_| ToolError::TimedOut {
                tool: tool.into(),
                after: self.timeout,
            })?
            .map_err(|source| ToolError::Spawn {
                tool: tool.into(),
                source,
            })?;
        let code = output.status.code();
        if output.status.success() || code.is_some_and(|c| ok_codes.contains(&c)) {
            Ok(ToolOutput {
                status: output.status,
                stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            })
        } else {
            Err(ToolError::Failed {
                tool: tool.into(),
                status: output.status,
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn captures_stdout_and_accepts_listed_codes() {
        let r = CommandRunner::new(Duration::from_secs(5));
        let out = r.run("echo", ["hello"], &[]).await.unwrap();
        assert_eq!(out.stdout.trim(), "hello");
        let out = r.run("sh", ["-c", "exit 2"], &[2]).await.unwrap();
        assert_eq!(out.status.code(), Some(2));
    }

    #[tokio::test]
    async fn failures_carry_stderr() {
        let r = CommandRunner::new(Duration::from_secs(5));
        let err = r
            .run("sh", ["-c", "echo broken >&2; exit 3"], &[])
            .await
            .unwrap_err();
        assert!(err.to_string().contains("broken"), "{err}");
    }

    #[tokio::test]
    async fn missing_tools_and_timeouts_are_distinct() {
        let r = CommandRunner::new(Duration::from_millis(200));
        assert!(matches!(
            r.run("no-such-tool-handoff", [""; 0], &[]).await,
            Err(ToolError::NotInstalled { .. })
        ));
        assert!(matches!(
            r.run("sleep", ["5"], &[]).await,
            Err(ToolError::TimedOut { .. })
        ));
    }
}
