//! Progress on stderr: one spinner style for every long-running command. Hidden when asked
//! (`-q`) and, by indicatif, when stderr is not a terminal.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// A spinner with `template` (indicatif syntax), or a hidden bar when `show` is false.
pub fn spinner(show: bool, template: &str) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// The template of a spinner that counts batches.
pub const BATCHES: &str = "{spinner} {pos} batches · {msg} [{elapsed}]";
