//! # mgpu-top
//!
//! `mgpu_top`: a live terminal dashboard of the mgpu scheduler. Each GPU's reserved and used
//! memory, then the running jobs and the queue (the rows of `mgpu_queue`), refreshed every
//! second. It only reads: each refresh is one queue request, as `mgpu_queue` makes, so anyone
//! may run it. The screen is drawn from a [`View`] by [`draw`], which the tests render into a
//! buffer.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use mgpu_cli::fit::{self, Col};
use mgpu_cli::queue::{drain_lines, fetch, foreign_lines, job_rows, JOB_COLUMNS, USED_COLUMN};
use mgpu_core::JobState;
use mgpu_proto::{GpuInfo, QueueRequest, QueueSnapshot};
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Paragraph, Row, Table};
use ratatui::Frame;

/// Set by SIGTERM, SIGHUP or SIGINT: the loop ends and the terminal is given back as it was.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// A signal to stop ends the loop (within a refresh interval) instead of killing the process
/// with the terminal still in raw mode.
fn catch_stop_signals() -> Result<()> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let action = SigAction::new(
        SigHandler::Handler(on_stop_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in [Signal::SIGTERM, Signal::SIGHUP, Signal::SIGINT] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { sigaction(sig, &action) }.context("installing a signal handler")?;
    }
    Ok(())
}

/// How long one refresh may take before the dashboard says the server does not answer.
const FETCH_TIMEOUT: Duration = Duration::from_secs(3);
/// Width of a GPU's memory bar, in cells.
const BAR: usize = 24;

/// Live dashboard of the mgpu scheduler: GPUs, running jobs and the queue.
///
/// Keys: q or Esc quit; m only your jobs; r a row for each waiting task of a job array;
/// Up/Down, PgUp/PgDn, Home scroll the jobs.
#[derive(Debug, Parser)]
#[command(name = "mgpu_top", version, verbatim_doc_comment)]
pub struct Args {
    /// Seconds between refreshes
    #[arg(short = 'n', long, value_name = "SECS", default_value_t = 1.0)]
    pub interval: f64,
    /// Start with only your own jobs (m toggles)
    #[arg(long)]
    pub me: bool,
    /// Server socket [default: $MGPU_SOCKET, else /run/mgpu/mgpu.sock, or your own server's in $XDG_RUNTIME_DIR/mgpu]
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Print one screen as text (COLUMNSxLINES, e.g. 120x30) and exit: no terminal needed
    #[arg(long, value_name = "WxH", value_parser = parse_size)]
    pub once: Option<(u16, u16)>,
}

fn parse_size(s: &str) -> Result<(u16, u16), String> {
    s.split_once('x')
        .and_then(|(w, h)| Some((w.parse().ok()?, h.parse().ok()?)))
        .filter(|&(w, h): &(u16, u16)| (20..=1000).contains(&w) && (5..=1000).contains(&h))
        .ok_or_else(|| format!("invalid size '{s}': use COLUMNSxLINES, e.g. 120x30"))
}

/// One screen of `view` as text, `width` columns by `height` lines (colours left out).
pub fn render_text(view: &View, width: u16, height: u16) -> Result<String> {
    let backend = ratatui::backend::TestBackend::new(width, height);
    let mut terminal = ratatui::Terminal::new(backend)?;
    terminal.draw(|f| draw(f, view))?;
    let buffer = terminal.backend().buffer();
    let mut out = String::new();
    for y in 0..height {
        let line: String = (0..width).map(|x| buffer[(x, y)].symbol()).collect();
        out.push_str(line.trim_end());
        out.push('\n');
    }
    Ok(out)
}

/// What the dashboard shows.
#[derive(Debug, Default)]
pub struct View {
    /// The latest queue the server sent.
    pub snapshot: Option<QueueSnapshot>,
    /// Its jobs as table rows (built once per snapshot or toggle, not per redraw).
    pub rows: Vec<[String; 10]>,
    /// Why the latest refresh failed, if it did (the previous snapshot stays on screen).
    pub error: Option<String>,
    /// Only the caller's own jobs.
    pub me: bool,
    /// A row for each waiting task of a job array.
    pub array_tasks: bool,
    /// Job rows scrolled past.
    pub scroll: usize,
    pub socket: String,
}

impl View {
    /// Rebuilds the job rows from the snapshot.
    pub fn rebuild_rows(&mut self) {
        self.rows = self
            .snapshot
            .as_ref()
            .map(|s| job_rows(s, self.array_tasks))
            .unwrap_or_default();
    }
}

pub fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mgpu_top: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<()> {
    if !(0.1..=3600.0).contains(&args.interval) {
        bail!("--interval must be between 0.1 and 3600 seconds");
    }
    if args.once.is_none() && !std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        bail!(
            "mgpu_top needs a terminal; in scripts use mgpu_top --once 120x30, mgpu_queue or \
             mgpu_queue --json"
        );
    }
    let interval = Duration::from_secs_f64(args.interval);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let socket = mgpu_proto::client_socket(args.socket.as_deref(), nix::unistd::getuid().as_raw());
    let mut view = View {
        me: args.me,
        socket: socket.display().to_string(),
        ..View::default()
    };
    // The first refresh before the screen is taken: a server that is not there is said plainly.
    refresh(&rt, &socket, &mut view);
    if let (None, Some(e)) = (&view.snapshot, &view.error) {
        bail!("{e}");
    }
    if let Some((width, height)) = args.once {
        use std::io::Write;
        let text = render_text(&view, width, height)?;
        let mut out = std::io::stdout().lock();
        match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
            // `mgpu_top --once ... | head`: the reader has what it wanted.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            r => r.context("writing to stdout")?,
        }
        return Ok(());
    }
    catch_stop_signals()?;
    let mut terminal = ratatui::init();
    let result = event_loop(&mut terminal, &rt, &socket, &mut view, interval);
    ratatui::restore();
    result
}

/// Draws, waits for a key or the next refresh, until the user quits.
fn event_loop(
    terminal: &mut ratatui::DefaultTerminal,
    rt: &tokio::runtime::Runtime,
    socket: &Path,
    view: &mut View,
    interval: Duration,
) -> Result<()> {
    let mut next = Instant::now() + interval;
    // A signal can land while the loop waits: it is seen at the next wake-up, at most a
    // quarter of a second later.
    let tick = Duration::from_millis(250);
    // Drawn again only after a refresh, a key or a resize.
    let mut dirty = true;
    loop {
        if STOP.load(Ordering::Relaxed) {
            return Ok(());
        }
        if dirty {
            terminal.draw(|f| draw(f, view))?;
            dirty = false;
        }
        if event::poll(next.saturating_duration_since(Instant::now()).min(tick))? {
            let event = event::read()?;
            dirty = matches!(event, Event::Resize(..));
            if let Event::Key(k) = event {
                if k.kind != KeyEventKind::Press {
                    continue;
                }
                dirty = true;
                match k.code {
                    KeyCode::Char('q') | KeyCode::Esc => return Ok(()),
                    KeyCode::Char('c') if k.modifiers.contains(KeyModifiers::CONTROL) => {
                        return Ok(())
                    }
                    KeyCode::Char('m') => {
                        view.me = !view.me;
                        view.scroll = 0;
                        next = Instant::now();
                    }
                    KeyCode::Char('r') => {
                        view.array_tasks = !view.array_tasks;
                        view.rebuild_rows();
                    }
                    KeyCode::Down => view.scroll += 1,
                    KeyCode::Up => view.scroll = view.scroll.saturating_sub(1),
                    KeyCode::PageDown => view.scroll += 10,
                    KeyCode::PageUp => view.scroll = view.scroll.saturating_sub(10),
                    KeyCode::Home => view.scroll = 0,
                    _ => {}
                }
            }
        }
        if Instant::now() >= next {
            refresh(rt, socket, view);
            next = Instant::now() + interval;
            dirty = true;
        }
    }
}

/// Fetches the queue; on failure keeps the previous snapshot and says why.
fn refresh(rt: &tokio::runtime::Runtime, socket: &Path, view: &mut View) {
    let req = QueueRequest {
        me: view.me,
        ..QueueRequest::default()
    };
    let got = rt.block_on(async {
        tokio::time::timeout(FETCH_TIMEOUT, fetch(Some(socket), "mgpu_top", req))
            .await
            .context("the server did not answer within 3 s")?
    });
    match got {
        Ok(s) => {
            view.snapshot = Some(s);
            view.error = None;
            view.rebuild_rows();
        }
        Err(e) => view.error = Some(format!("{e:#}")),
    }
}

/// A GPU's reserved memory as a bar of `bar` cells, with the figures.
fn memory_bar(g: &GpuInfo, bar: usize) -> String {
    let filled = if g.total_mib == 0 {
        0
    } else {
        (g.reserved_mib.min(g.total_mib) as u128 * bar as u128).div_ceil(g.total_mib as u128)
            as usize
    };
    format!(
        "{}{} {:>3}%",
        "█".repeat(filled),
        "░".repeat(bar - filled),
        (g.reserved_mib as u128 * 100)
            .checked_div(g.total_mib as u128)
            .unwrap_or(0)
    )
}

/// `HH:MM:SS ZONE` of a time in ms since the epoch, in the local zone (`TZ` honoured).
fn clock(ms: u64) -> String {
    let zone = mgpu_cli::localtime::local(ms).zone;
    format!("{} {zone}", mgpu_cli::localtime::clock(ms))
        .trim_end()
        .to_string()
}

/// The jobs table's columns as they give way on a narrow terminal: names and reasons are cut
/// with an ellipsis, numbers never; RESTARTS, then USED, MEM and USER are left out.
const JOB_FIT: [Col; 10] = [
    Col::keep(JOB_COLUMNS[0]),
    Col::text(JOB_COLUMNS[1], 6).optional(3),
    Col::text(JOB_COLUMNS[2], 8),
    Col::keep(JOB_COLUMNS[3]),
    Col::keep(JOB_COLUMNS[4]),
    Col::keep(JOB_COLUMNS[5]).optional(4),
    Col::keep(JOB_COLUMNS[6]).optional(5),
    Col::keep(JOB_COLUMNS[7]),
    Col::keep(JOB_COLUMNS[8]).optional(6),
    Col::text(JOB_COLUMNS[9], 6),
];

/// The GPU table's columns: the name is cut, the bar shortened (to 4 cells), the figures kept.
const GPU_FIT: [Col; 7] = [
    Col::keep("GPU"),
    Col::text("NAME", 8),
    Col::text("RESERVED", 9),
    Col::keep("RESERVED MiB"),
    Col::keep("USED MiB"),
    Col::keep("UTIL").optional(1),
    Col::text("JOBS", 4),
];

/// Lines of processes that are not mgpu jobs shown at most (the rest are counted).
const FOREIGN_SHOWN: usize = 4;

/// The whole screen: a header, the GPUs, processes outside mgpu, the jobs, the keys.
pub fn draw(frame: &mut Frame, view: &View) {
    let gpus = view.snapshot.as_ref().map_or(0, |s| s.gpus.len()) as u16;
    // Drained GPUs (and server) first, then processes outside mgpu.
    let mut foreign = view
        .snapshot
        .as_ref()
        .map(|s| {
            let mut lines = drain_lines(s);
            lines.extend(foreign_lines(s));
            lines
        })
        .unwrap_or_default();
    if foreign.len() > FOREIGN_SHOWN {
        let more = foreign.len() - (FOREIGN_SHOWN - 1);
        foreign.truncate(FOREIGN_SHOWN - 1);
        foreign.push(format!(
            "... and {more} more (mgpu_queue --json lists them)"
        ));
    }
    let [header, gpu_area, foreign_area, job_area, footer] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(gpus + 3),
        Constraint::Length(foreign.len() as u16),
        Constraint::Min(4),
        Constraint::Length(1),
    ])
    .areas(frame.area());

    let bold = Style::default().add_modifier(Modifier::BOLD);
    let mut title = vec![
        Span::styled("mgpu_top", bold),
        Span::raw(format!("  {}", view.socket)),
    ];
    if let Some(s) = &view.snapshot {
        let running = s
            .jobs
            .iter()
            .filter(|j| j.state == JobState::Running)
            .count();
        title.push(Span::raw(format!(
            "  policy {}  {} running, {} waiting{}  {}",
            s.policy,
            running,
            s.jobs.len() - running,
            if view.me { " (yours)" } else { "" },
            clock(s.now)
        )));
    }
    if let Some(e) = &view.error {
        title.push(Span::styled(
            format!("  {e}"),
            Style::default().fg(Color::Red),
        ));
    }
    frame.render_widget(Paragraph::new(Line::from(title)), header);

    let Some(s) = &view.snapshot else {
        return;
    };
    let gpu_cells: Vec<Vec<String>> = s
        .gpus
        .iter()
        .map(|g| {
            let jobs: Vec<String> = g.jobs.iter().map(u64::to_string).collect();
            vec![
                g.index.to_string(),
                g.name.clone(),
                memory_bar(g, BAR),
                format!("{}/{}", g.reserved_mib, g.total_mib),
                g.used_mib.to_string(),
                g.util_pct.map_or("-".into(), |u| format!("{u}%")),
                if jobs.is_empty() {
                    "-".into()
                } else {
                    jobs.join(",")
                },
            ]
        })
        .collect();
    let gpu_lay = fit::layout(
        &GPU_FIT,
        &gpu_cells,
        1,
        Some(gpu_area.width.saturating_sub(2) as usize),
    );
    let gpu_rows = s.gpus.iter().zip(&gpu_cells).map(|(g, cells)| {
        Row::new(gpu_lay.iter().map(|&(i, w)| {
            if i == 2 {
                // The bar is drawn to fit, never cut.
                memory_bar(g, w.saturating_sub(5).clamp(1, BAR))
            } else {
                fit::cut(&cells[i], w)
            }
        }))
    });
    let gpu_table = Table::new(
        gpu_rows,
        gpu_lay.iter().map(|&(_, w)| Constraint::Length(w as u16)),
    )
    .header(Row::new(gpu_lay.iter().map(|&(i, _)| GPU_FIT[i].name)).style(bold))
    .block(Block::default().borders(Borders::ALL).title(" GPUs "));
    frame.render_widget(gpu_table, gpu_area);
    // Someone bypassing the scheduler: for the admin to act on.
    frame.render_widget(
        Paragraph::new(foreign.into_iter().map(Line::from).collect::<Vec<_>>())
            .style(Style::default().fg(Color::Magenta)),
        foreign_area,
    );

    let rows = &view.rows;
    let visible = job_area.height.saturating_sub(3) as usize;
    let scroll = view.scroll.min(rows.len().saturating_sub(visible.max(1)));
    let shown = rows.len().saturating_sub(scroll).min(visible);
    let page: Vec<Vec<String>> = rows
        .iter()
        .skip(scroll)
        .take(visible)
        .map(|r| r.to_vec())
        .collect();
    let job_lay = fit::layout(
        &JOB_FIT,
        &page,
        1,
        Some(job_area.width.saturating_sub(2) as usize),
    );
    let job_table = Table::new(
        page.iter().map(|r| {
            // A job using more GPU memory than it reserved (`!` in USED) stands out.
            let color = match r[3].as_str() {
                _ if r[USED_COLUMN].ends_with('!') => Color::Red,
                "RUNNING" => Color::Green,
                _ => Color::Yellow,
            };
            Row::new(job_lay.iter().map(|&(i, w)| fit::cut(&r[i], w)))
                .style(Style::default().fg(color))
        }),
        job_lay.iter().map(|&(_, w)| Constraint::Length(w as u16)),
    )
    .header(Row::new(job_lay.iter().map(|&(i, _)| JOB_COLUMNS[i])).style(bold))
    .block(Block::default().borders(Borders::ALL).title(format!(
        " Jobs {}-{} of {} ",
        if shown == 0 { 0 } else { scroll + 1 },
        scroll + shown,
        rows.len()
    )));
    frame.render_widget(job_table, job_area);

    let on = |b: bool| if b { "on" } else { "off" };
    frame.render_widget(
        Paragraph::new(format!(
            "q quit   m only mine: {}   r a row per array task: {}   Up/Down PgUp/PgDn Home scroll",
            on(view.me),
            on(view.array_tasks)
        )),
        footer,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use mgpu_proto::{ArrayTask, JobInfo};
    use ratatui::backend::TestBackend;
    use ratatui::Terminal;

    fn job(id: u64, running: bool, array: Option<u32>) -> JobInfo {
        JobInfo {
            id,
            user: "alice".into(),
            name: "sweep".into(),
            state: if running {
                JobState::Running
            } else {
                JobState::Pending
            },
            gpus: 1,
            gpu_ids: if running { vec![0] } else { vec![] },
            mem_mib: Some(40_960),
            time_limit_s: Some(3600),
            submitted_at: 0,
            started_at: running.then_some(0),
            restarts: 0,
            reason: (!running).then(|| "JobArrayTaskLimit".into()),
            command: vec!["python".into()],
            priority: None,
            est_start: None,
            behind: None,
            behind_start: None,
            array: array.map(|task| ArrayTask {
                job: 10,
                task,
                count: 6,
                min: 0,
                max: 5,
                limit: Some(2),
            }),
            used_mib: None,
            peak_mib: None,
            estimate_ms: None,
            estimate_source: None,
        }
    }

    fn screen(view: &View, width: u16, height: u16) -> String {
        let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
        terminal.draw(|f| draw(f, view)).unwrap();
        let buffer = terminal.backend().buffer();
        (0..height)
            .map(|y| {
                (0..width)
                    .map(|x| buffer[(x, y)].symbol())
                    .collect::<String>()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The screen has the GPUs with their memory bars, the jobs as `mgpu_queue` shows them
    /// (waiting array tasks in one row), and says when the server does not answer.
    #[test]
    fn the_dashboard_shows_gpus_jobs_and_errors() {
        let snapshot = QueueSnapshot {
            server_drained: None,
            now: 3_600_000,
            policy: "fair".into(),
            gpus: vec![GpuInfo {
                index: 0,
                name: "NVIDIA H200".into(),
                total_mib: 143_771,
                reserved_mib: 81_920,
                used_mib: 60_000,
                jobs: vec![10, 11],
                util_pct: None,
                foreign: vec![],
                drained: None,
            }],
            jobs: vec![
                job(10, true, Some(0)),
                job(11, true, Some(1)),
                job(12, false, Some(2)),
                job(13, false, Some(3)),
                job(14, false, Some(5)),
            ],
        };
        let mut view = View {
            snapshot: Some(snapshot),
            socket: "/tmp/mgpu.sock".into(),
            ..View::default()
        };
        view.rebuild_rows();
        let text = screen(&view, 120, 20);
        for want in [
            "NVIDIA H200",
            "81920/143771",
            "60000",
            "10,11",
            "sweep[0]",
            "12-14",
            "sweep[2-3,5]",
            "JobArrayTaskLimit",
            "2 running, 3 waiting",
            "01:00:00 UTC",
            "Jobs 1-3 of 3",
        ] {
            assert!(text.contains(want), "{want:?} missing from:\n{text}");
        }
        assert!(
            text.contains(&format!("{}{}", "█".repeat(14), "░".repeat(10))),
            "{text}"
        );

        view.array_tasks = true;
        view.rebuild_rows();
        view.error = Some("cannot connect to /tmp/mgpu.sock".into());
        let text = screen(&view, 120, 20);
        assert!(
            text.contains("sweep[5]") && text.contains("Jobs 1-5 of 5"),
            "{text}"
        );
        assert!(text.contains("cannot connect"), "{text}");

        // A small screen scrolls the jobs.
        view.scroll = 4;
        let text = screen(&view, 120, 11);
        assert!(text.contains("Jobs 4-5 of 5"), "{text}");
    }

    /// Used vs reserved per job, with a warning colour for a job over its reservation; the
    /// GPU's utilisation; processes outside mgpu with their user.
    #[test]
    fn used_memory_overuse_and_foreign_processes_are_shown() {
        let mut over = job(10, true, None);
        over.used_mib = Some([(0, 50_000)].into());
        over.peak_mib = Some(50_000);
        let mut inside = job(11, true, None);
        inside.used_mib = Some([(0, 1_000)].into());
        let snapshot = QueueSnapshot {
            server_drained: None,
            now: 0,
            policy: "fair".into(),
            gpus: vec![GpuInfo {
                index: 0,
                name: "NVIDIA H200".into(),
                total_mib: 143_771,
                reserved_mib: 81_920,
                used_mib: 60_000,
                jobs: vec![10, 11],
                util_pct: Some(87),
                foreign: vec![mgpu_proto::ForeignProcess {
                    pid: 4242,
                    user: Some("mallory".into()),
                    used_mib: 9_000,
                }],
                drained: Some("upgrade".into()),
            }],
            jobs: vec![over, inside],
        };
        let mut view = View {
            snapshot: Some(snapshot),
            ..View::default()
        };
        view.rebuild_rows();
        let mut terminal = Terminal::new(TestBackend::new(120, 20)).unwrap();
        terminal.draw(|f| draw(f, &view)).unwrap();
        let buffer = terminal.backend().buffer().clone();
        let text = screen(&view, 120, 20);
        for want in [
            "USED",
            "50000M!",
            "1000M ",
            "87%",
            "not an mgpu job: pid 4242 (mallory) uses 9000 MiB on GPU 0",
            "GPU 0 drained (upgrade): no new jobs go there",
        ] {
            assert!(text.contains(want), "{want:?} missing from:\n{text}");
        }
        // The row of the job over its reservation is red; the other is green.
        let fg_of = |needle: &str| {
            let (y, line) = text
                .lines()
                .enumerate()
                .find(|(_, l)| l.contains(needle))
                .unwrap();
            let x = line[..line.find(needle).unwrap()].chars().count() as u16;
            buffer[(x, y as u16)].fg
        };
        assert_eq!(fg_of("50000M!"), Color::Red);
        assert_eq!(fg_of("1000M "), Color::Green);
    }

    #[test]
    fn memory_bars() {
        let g = |reserved_mib, total_mib| GpuInfo {
            index: 0,
            name: String::new(),
            total_mib,
            reserved_mib,
            used_mib: 0,
            jobs: vec![],
            util_pct: None,
            foreign: vec![],
            drained: None,
        };
        assert_eq!(
            memory_bar(&g(0, 100), BAR),
            format!("{}   0%", "░".repeat(BAR))
        );
        assert_eq!(
            memory_bar(&g(100, 100), BAR),
            format!("{} 100%", "█".repeat(BAR))
        );
        assert!(
            memory_bar(&g(1, 100), BAR).starts_with('█'),
            "any use shows"
        );
        assert_eq!(
            memory_bar(&g(5, 0), BAR),
            format!("{}   0%", "░".repeat(BAR))
        );
    }
}
