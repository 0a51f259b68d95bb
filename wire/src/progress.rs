//! Progress of long work (a mirror's first copy, the lab's startup, a
//! drill): a bar on a terminal, drawn by indicatif on stderr, and plain lines
//! otherwise, so a log file or CI output still says how far along it is,
//! how fast, and how long is left.
//!
//! Off a terminal the first update is logged at once, then at most one line
//! every [`LOG_EVERY`], then a last line from [`Progress::finish`].

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// Off a terminal: the most one piece of work logs.
pub const LOG_EVERY: Duration = Duration::from_secs(2);

/// Where the lines go off a terminal: the process's log (a daemon), or
/// plain stderr (a command a person runs, whose log level hides info).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lines {
    Tracing,
    Stderr,
}

pub struct Progress {
    bar: Option<ProgressBar>,
    /// What the whole work is (the last line names it), and what it does
    /// now (the bar's message).
    title: String,
    what: String,
    unit: &'static str,
    total: u64,
    done: u64,
    started: Instant,
    logged: Option<Instant>,
    lines: Lines,
}

impl Progress {
    /// `total` units of work named `what` (0: not known yet); a bar when
    /// stderr is a terminal.
    pub fn new(what: impl Into<String>, unit: &'static str, total: u64, lines: Lines) -> Self {
        let rate = format!("{{human_pos}}/{{human_len}} {unit} ({{per_sec}}, {{eta}} left)");
        Self::with_template(what.into(), unit, total, lines, &rate)
    }

    /// Steps of unequal length (the lab's startup): the bar shows the time
    /// so far rather than a rate.
    pub fn steps(what: impl Into<String>, total: u64, lines: Lines) -> Self {
        Self::with_template(what.into(), "steps", total, lines, "{pos}/{len} steps ({elapsed})")
    }

    fn with_template(what: String, unit: &'static str, total: u64, lines: Lines, counts: &str) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total);
            let template = format!("{{spinner}} {{msg}} [{{bar:30}}] {counts}");
            if let Ok(style) = ProgressStyle::with_template(&template) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_message(what.clone());
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        Self { bar, title: what.clone(), what, unit, total, done: 0, started: Instant::now(), logged: None, lines }
    }

    /// Is a bar drawn (stderr is a terminal)?
    pub fn on_terminal(&self) -> bool {
        self.bar.is_some()
    }

    pub fn set_total(&mut self, total: u64) {
        self.total = total;
        if let Some(b) = &self.bar {
            b.set_length(total);
        }
    }

    /// Sets how much is done.
    pub fn set(&mut self, done: u64) {
        self.done = done;
        match &self.bar {
            Some(b) => b.set_position(done),
            None if self.logged.is_none_or(|t| t.elapsed() >= LOG_EVERY) => {
                self.logged = Some(Instant::now());
                self.line(&self.status());
            }
            None => {}
        }
    }

    pub fn inc(&mut self, n: u64) {
        self.set(self.done + n);
    }

    /// Replaces what the bar says it does (the lab's current step).
    pub fn message(&mut self, what: impl Into<String>) {
        self.what = what.into();
        if let Some(b) = &self.bar {
            b.set_message(self.what.clone());
        }
    }

    /// A line of its own: above the bar on a terminal, else a plain line.
    pub fn note(&self, line: &str) {
        match &self.bar {
            Some(b) => b.println(line),
            None => self.line(line),
        }
    }

    /// Ends the bar, and says what was done and how fast.
    pub fn finish(&mut self) {
        let took = self.started.elapsed();
        let mut summary = format!("{}: {} {} in {:.1} s", self.title, self.done, self.unit, took.as_secs_f64());
        if self.unit != "steps" {
            summary.push_str(&format!(" ({:.0}/s)", self.per_second()));
        }
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
            eprintln!("{summary}");
        } else {
            self.line(&summary);
        }
    }

    /// Units per second since the start.
    pub fn per_second(&self) -> f64 {
        let secs = self.started.elapsed().as_secs_f64();
        if secs > 0.0 {
            self.done as f64 / secs
        } else {
            0.0
        }
    }

    /// Time left at the rate so far; `None` while nothing is done or the
    /// total is unknown.
    pub fn eta(&self) -> Option<Duration> {
        let rate = self.per_second();
        (self.total > 0 && self.done > 0 && rate > 0.0)
            .then(|| Duration::from_secs_f64(self.total.saturating_sub(self.done) as f64 / rate))
    }

    /// `what: done/total unit, R/s, ETA Ns`.
    pub fn status(&self) -> String {
        let eta = self.eta().map_or("unknown".to_string(), |d| format!("{:.0} s", d.as_secs_f64().ceil()));
        format!(
            "{}: {}/{} {}, {:.0}/s, ETA {eta}",
            self.what,
            self.done,
            if self.total > 0 { self.total.to_string() } else { "?".to_string() },
            self.unit,
            self.per_second()
        )
    }

    fn line(&self, text: &str) {
        match self.lines {
            Lines::Tracing => tracing::info!("{text}"),
            Lines::Stderr => eprintln!("{text}"),
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(b) = self.bar.take() {
            b.abandon();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_and_eta_follow_the_work_done() {
        let mut p = Progress::new("copy", "keys", 1000, Lines::Tracing);
        assert_eq!(p.eta(), None, "nothing done yet");
        std::thread::sleep(Duration::from_millis(50));
        p.set(500);
        let eta = p.eta().expect("half done");
        // Half the work took ~50 ms; the other half should take about as long.
        assert!(eta > Duration::from_millis(10) && eta < Duration::from_secs(2), "{eta:?}");
        assert!(p.status().starts_with("copy: 500/1000 keys"), "{}", p.status());
        p.set_total(0);
        assert_eq!(p.eta(), None, "an unknown total has no ETA");
        assert!(p.status().contains("500/? keys"), "{}", p.status());
    }
}
