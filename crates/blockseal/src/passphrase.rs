//! Getting a key file passphrase: from a named environment variable, from an open
//! file descriptor, or from an interactive prompt with echo off.
//!
//! Shared by every subcommand that creates or opens a key file (`key init`,
//! `key check`, `serve`). The passphrase is held in zeroizing buffers sized up
//! front, so reading it leaves no stray copies in freed memory, and it is never
//! printed.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};

use anyhow::{Context, bail};
use blockseal_keys::{Passphrase, Zeroizing};
use clap::Args;
use rustix::termios::{self, LocalModes, OptionalActions, Termios};

/// Longest passphrase accepted, in bytes.
const MAX_LEN: usize = 1024;

/// Where a passphrase comes from. At most one source may be given; none means no
/// passphrase.
#[derive(Debug, Clone, Default, Args)]
#[group(id = "passphrase", multiple = false)]
pub(crate) struct PassphraseArgs {
    /// Read the passphrase from the environment variable VAR.
    #[arg(long, value_name = "VAR")]
    pub(crate) passphrase_env: Option<String>,

    /// Read the passphrase from file descriptor N (up to end of file; one trailing
    /// newline is dropped).
    #[arg(long, value_name = "N")]
    pub(crate) passphrase_fd: Option<u32>,

    /// Ask for the passphrase on the terminal, with echo off.
    #[arg(long)]
    pub(crate) passphrase_prompt: bool,
}

/// Whether a prompted passphrase must be typed twice (when it is being set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Confirm {
    /// Ask once (opening an existing file).
    Once,
    /// Ask twice and require both to match (protecting a new file).
    Twice,
}

impl PassphraseArgs {
    /// Reads the passphrase from the chosen source, or `None` when none was given.
    /// `what` names the file in the prompt.
    pub(crate) fn read(&self, what: &str, confirm: Confirm) -> anyhow::Result<Option<Passphrase>> {
        let text = if let Some(var) = &self.passphrase_env {
            from_env(var)?
        } else if let Some(fd) = self.passphrase_fd {
            from_fd(fd)?
        } else if self.passphrase_prompt {
            from_prompt(what, confirm)?
        } else {
            return Ok(None);
        };
        if text.is_empty() {
            bail!("the passphrase is empty");
        }
        Ok(Some(Passphrase::from(text)))
    }
}

/// Reads a passphrase from the file at `path` (up to end of file; one
/// trailing newline is dropped), as `--passphrase-file` gives it.
pub(crate) fn from_file(path: &std::path::Path) -> anyhow::Result<Passphrase> {
    let file = File::open(path)
        .with_context(|| format!("cannot open the passphrase file {}", path.display()))?;
    let mut bytes = Zeroizing::new(Vec::with_capacity(MAX_LEN + 1));
    file.take(MAX_LEN as u64 + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("cannot read the passphrase file {}", path.display()))?;
    if bytes.len() > MAX_LEN {
        bail!(
            "the passphrase in {} is longer than {MAX_LEN} bytes",
            path.display()
        );
    }
    strip_newline(&mut bytes);
    let text =
        into_string(bytes).with_context(|| format!("the passphrase in {}", path.display()))?;
    if text.is_empty() {
        bail!("the passphrase file {} is empty", path.display());
    }
    Ok(Passphrase::from(text))
}

/// Asks for a passphrase on the terminal, with echo off (twice when it is
/// being set); `what` names what it protects.
pub(crate) fn prompt(what: &str, confirm: Confirm) -> anyhow::Result<Passphrase> {
    let text = from_prompt(what, confirm)?;
    if text.is_empty() {
        bail!("the passphrase is empty");
    }
    Ok(Passphrase::from(text))
}

fn from_env(var: &str) -> anyhow::Result<Zeroizing<String>> {
    match std::env::var(var) {
        Ok(value) => Ok(Zeroizing::new(value)),
        Err(std::env::VarError::NotPresent) => {
            bail!("environment variable {var} is not set")
        }
        Err(std::env::VarError::NotUnicode(_)) => {
            bail!("environment variable {var} is not valid UTF-8")
        }
    }
}

fn from_fd(fd: u32) -> anyhow::Result<Zeroizing<String>> {
    // Opening /dev/fd/N gives a new handle on the descriptor without unsafe code.
    let file = File::open(format!("/dev/fd/{fd}"))
        .with_context(|| format!("could not open file descriptor {fd} for the passphrase"))?;
    let mut bytes = Zeroizing::new(Vec::with_capacity(MAX_LEN + 1));
    file.take(MAX_LEN as u64 + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("could not read the passphrase from file descriptor {fd}"))?;
    if bytes.len() > MAX_LEN {
        bail!("the passphrase on file descriptor {fd} is longer than {MAX_LEN} bytes");
    }
    strip_newline(&mut bytes);
    into_string(bytes).with_context(|| format!("the passphrase on file descriptor {fd}"))
}

fn from_prompt(what: &str, confirm: Confirm) -> anyhow::Result<Zeroizing<String>> {
    let mut tty = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tty")
        .context("--passphrase-prompt needs a terminal, and none is available")?;
    let first = prompt_once(&mut tty, &format!("Passphrase for {what}: "))?;
    if confirm == Confirm::Twice {
        let second = prompt_once(&mut tty, "Repeat the passphrase: ")?;
        if *first != *second {
            bail!("the passphrases do not match");
        }
    }
    Ok(first)
}

/// Writes `prompt` to the terminal and reads one line with echo off.
fn prompt_once(tty: &mut File, prompt: &str) -> anyhow::Result<Zeroizing<String>> {
    tty.write_all(prompt.as_bytes())
        .and_then(|()| tty.flush())
        .context("could not write to the terminal")?;
    let echo_off = EchoOff::new(tty)?;
    let mut line = Zeroizing::new(Vec::with_capacity(MAX_LEN + 1));
    let mut byte = [0u8; 1];
    loop {
        let n = (&*echo_off.tty)
            .read(&mut byte)
            .context("could not read the passphrase from the terminal")?;
        if n == 0 || byte[0] == b'\n' {
            break;
        }
        if line.len() == MAX_LEN {
            bail!("the passphrase is longer than {MAX_LEN} bytes");
        }
        line.push(byte[0]);
    }
    byte.fill(0);
    drop(echo_off);
    strip_newline(&mut line);
    into_string(line).context("the passphrase typed")
}

/// Terminal echo turned off until dropped.
struct EchoOff<'a> {
    tty: &'a File,
    saved: Termios,
}

impl<'a> EchoOff<'a> {
    fn new(tty: &'a File) -> anyhow::Result<EchoOff<'a>> {
        let saved = termios::tcgetattr(tty).context("could not read the terminal settings")?;
        let mut quiet = saved.clone();
        quiet.local_modes.remove(LocalModes::ECHO);
        // Still echo the newline, so that the next output starts on a fresh line.
        quiet.local_modes.insert(LocalModes::ECHONL);
        termios::tcsetattr(tty, OptionalActions::Flush, &quiet)
            .context("could not turn terminal echo off")?;
        Ok(EchoOff { tty, saved })
    }
}

impl Drop for EchoOff<'_> {
    fn drop(&mut self) {
        // Nothing more can be done if restoring fails; the shell's `reset` fixes it.
        let _ = termios::tcsetattr(self.tty, OptionalActions::Now, &self.saved);
    }
}

/// Drops one trailing `\n` or `\r\n`.
fn strip_newline(bytes: &mut Zeroizing<Vec<u8>>) {
    if bytes.last() == Some(&b'\n') {
        bytes.pop();
        if bytes.last() == Some(&b'\r') {
            bytes.pop();
        }
    }
}

/// Turns the bytes into a string without copying them.
fn into_string(mut bytes: Zeroizing<Vec<u8>>) -> anyhow::Result<Zeroizing<String>> {
    if std::str::from_utf8(&bytes).is_err() {
        bail!("is not valid UTF-8");
    }
    let owned = std::mem::take(&mut *bytes);
    let text = String::from_utf8(owned).expect("checked to be UTF-8 just above");
    Ok(Zeroizing::new(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_one_newline() {
        for (input, expected) in [
            (&b"abc\n"[..], &b"abc"[..]),
            (b"abc\r\n", b"abc"),
            (b"abc\n\n", b"abc\n"),
            (b"abc", b"abc"),
            (b"", b""),
        ] {
            let mut bytes = Zeroizing::new(input.to_vec());
            strip_newline(&mut bytes);
            assert_eq!(bytes.as_slice(), expected);
        }
    }

    #[test]
    fn refuses_invalid_utf8() {
        assert!(into_string(Zeroizing::new(vec![0xff])).is_err());
        assert_eq!(
            into_string(Zeroizing::new(b"ok".to_vec()))
                .unwrap()
                .as_str(),
            "ok"
        );
    }
}
