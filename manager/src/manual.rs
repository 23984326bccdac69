//! `channeld completions SHELL` (clap_complete) and `channeld man` (clap_mangen): both are built
//! from the same clap definitions as the command line itself ([`crate::cli::Cli`]), so they
//! cannot drift from it.

use std::io::Write;

use clap::CommandFactory as _;

use crate::cli::Cli;

/// Writes the completion script for `shell`.
pub fn completions(shell: clap_complete::Shell, out: &mut dyn Write) -> std::io::Result<()> {
    let mut command = Cli::command();
    clap_complete::generate(shell, &mut command, "channeld", out);
    out.flush()
}

/// Writes the manual page (roff), the verbs included.
pub fn man(out: &mut dyn Write) -> std::io::Result<()> {
    let command = Cli::command();
    clap_mangen::Man::new(command).render(out)?;
    out.flush()
}
