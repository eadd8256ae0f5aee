//! Progress of a long run: an indicatif bar when stdout is a terminal, plain lines (every tenth
//! of the way) otherwise, so logs and CI output stay readable.

use std::io::{IsTerminal, Write};

/// One run's progress towards `total` steps.
#[derive(Debug)]
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    label: String,
    total: u64,
    /// Non-terminal: the next step at which a line is printed (`u64::MAX`: none).
    next_line: u64,
}

impl Progress {
    /// Starts showing progress of `label` towards `total` `unit`s.
    pub fn new(label: &str, total: u64, unit: &str) -> Progress {
        let bar = std::io::stdout().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(total);
            let template = format!(
                "  {label} [{{bar:30}}] {{pos}}/{{len}} {unit} ({{percent}}%, {{per_sec}}, ETA {{eta}})"
            );
            if let Ok(style) = indicatif::ProgressStyle::with_template(&template) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar
        });
        Progress {
            bar,
            label: label.to_owned(),
            total,
            next_line: 0,
        }
    }

    /// Prints no progress lines of its own when not on a terminal (for callers whose
    /// [`Progress::println`] lines already say how far they are).
    pub fn no_plain_lines(mut self) -> Progress {
        self.next_line = u64::MAX;
        self
    }

    /// `done` steps are done.
    pub fn set(&mut self, done: u64) {
        match &self.bar {
            Some(bar) => bar.set_position(done),
            None => {
                if done >= self.next_line {
                    println!(
                        "  {}: {done}/{} ({:.0}%)",
                        self.label,
                        self.total,
                        100.0 * done as f64 / self.total.max(1) as f64
                    );
                    let _ = std::io::stdout().flush();
                    self.next_line = if done >= self.total {
                        u64::MAX
                    } else {
                        (done + (self.total / 10).max(1)).min(self.total)
                    };
                }
            }
        }
    }

    /// Prints `line` above the bar (or as a plain line).
    pub fn println(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => {
                println!("{line}");
                let _ = std::io::stdout().flush();
            }
        }
    }

    /// Leaves the finished bar on screen.
    pub fn finish(self) {
        if let Some(bar) = self.bar {
            bar.finish();
        }
    }
}
