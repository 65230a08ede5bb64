//! PNG plots of runs: per-batch learning curves, test scores across runs and confusion
//! heatmaps, read from the run tables with SQL and drawn with plotters.
//!
//! ```text
//! plot_run(runs, R, out)             out/{loss,accuracy,precision,recall,f1}.png
//! plot_compare(runs, [A, B], out)    out/{test_accuracy,test_loss}.png
//! plot_confusion(runs, R, S, out)    out/confusion-S.png   (S = train: the last epoch)
//! ```
//! The data comes from the `metrics` and `confusion` tables of [`crate::run::tables`] (never from
//! `run.json`). Test scores are weighted by images: `sum(v * images) / sum(images)`.
//! Text is drawn with DejaVu Sans compiled into the binary (the `dejavu` crate), so the
//! plots look the same on machines without any fonts installed. Images are rendered in
//! memory and written with [`crate::store::png::write_png`] (atomically).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Once;

use datafusion::prelude::SessionContext;
use plotters::coord::Shift;
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::error::{Error, Result};
use crate::run::read::{self, f64_values as f64_column, string_values as string_column};
use crate::run::tables::Run;

mod canvas;
use canvas::Canvas;

/// The font family the plots use (DejaVu Sans, registered on first use).
const FONT: &str = "sans-serif";
/// Title size, in pixels.
const TITLE_PX: f64 = 20.0;
/// Axis descriptions, legends and class names.
const LABEL_PX: f64 = 15.0;
/// Tick labels and cell counts.
const TICK_PX: f64 = 14.0;

/// Size of the curve plots.
const CURVE_SIZE: (u32, u32) = (1000, 600);
/// Height of the bar charts (their width grows with the number of runs).
const BAR_HEIGHT: u32 = 600;
/// Size of the confusion heatmap.
const HEATMAP_SIZE: (u32, u32) = (800, 750);

/// The per-batch values: thin and light.
const PER_BATCH_COLOUR: RGBColor = RGBColor(160, 190, 222);
/// The running mean: bold dark blue.
const MEAN_COLOUR: RGBColor = RGBColor(8, 62, 140);
/// The rolling window: medium orange.
const WINDOW_COLOUR: RGBColor = RGBColor(236, 112, 20);
/// The test score: dashed red.
const TEST_COLOUR: RGBColor = RGBColor(200, 24, 40);
/// Drift detections (purple, apart from the test line's red).
const DRIFT_COLOUR: RGBColor = RGBColor(128, 40, 170);
/// Shading of every other epoch.
const EPOCH_SHADE: RGBColor = RGBColor(237, 239, 244);
/// Bars, one colour per run in turn.
const BAR_COLOURS: [RGBColor; 6] = [
    RGBColor(49, 110, 180),
    RGBColor(236, 112, 20),
    RGBColor(44, 150, 70),
    RGBColor(190, 50, 60),
    RGBColor(130, 90, 180),
    RGBColor(120, 90, 70),
];

/// A metric drawn by [`plot_run`]: its column in `metrics`, file stem and axis name.
struct Curve {
    column: &'static str,
    file: &'static str,
    name: &'static str,
}

/// The five curves, in the order [`plot_run`] writes them.
const CURVES: [Curve; 5] = [
    Curve {
        column: "loss",
        file: "loss",
        name: "loss",
    },
    Curve {
        column: "acc",
        file: "accuracy",
        name: "accuracy",
    },
    Curve {
        column: "precision",
        file: "precision",
        name: "precision",
    },
    Curve {
        column: "recall",
        file: "recall",
        name: "recall",
    },
    Curve {
        column: "f1",
        file: "f1",
        name: "F1",
    },
];

/// Writes the learning curves of `run` under `runs_root` to `out_dir` (created if needed):
/// `loss.png`, `accuracy.png`, `precision.png`, `recall.png` and `f1.png`, one point per
/// training batch (scored before the model learnt from it), with the running mean, the
/// rolling window, the epochs and, when the run has test rows, the image-weighted test
/// value. Returns the written paths.
pub async fn plot_run(runs_root: &Path, run: &str, out_dir: &Path) -> Result<Vec<PathBuf>> {
    let ctx = session(runs_root)?;
    curves(&ctx, runs_root, run, out_dir).await
}

/// Writes `test_accuracy.png` and `test_loss.png` to `out_dir`: one bar per run of `runs`,
/// the image-weighted value over the run's `test` rows. A run without test rows (never
/// scored with `cifar-df predict`) or without any metrics is an error naming it.
pub async fn plot_compare(
    runs_root: &Path,
    runs: &[String],
    out_dir: &Path,
) -> Result<Vec<PathBuf>> {
    let ctx = session(runs_root)?;
    compare(&ctx, runs_root, runs, out_dir).await
}

/// Writes `confusion-SPLIT.png` to `out_dir`: the 10×10 confusion matrix of `run` on
/// `split` (`test` or `train`), rows actual and columns predicted classes, coloured by the
/// fraction of each actual class, with the counts printed. For `train`, only the last
/// epoch is counted.
pub async fn plot_confusion(
    runs_root: &Path,
    run: &str,
    split: &str,
    out_dir: &Path,
) -> Result<PathBuf> {
    let ctx = session(runs_root)?;
    confusion(&ctx, runs_root, run, split, out_dir).await
}

/// Everything for one run, as `cifar-df train` leaves it in `runs/NAME/plots/`: the
/// curves of [`plot_run`], and the confusion heatmap of the `test` split when the run has
/// one, else of the last training epoch (none when the run has no confusion rows at all).
pub async fn plot_all_for_run(runs_root: &Path, run: &str, out_dir: &Path) -> Result<Vec<PathBuf>> {
    let ctx = session(runs_root)?;
    let mut paths = curves(&ctx, runs_root, run, out_dir).await?;
    for split in ["test", "train"] {
        if read::confusion(&ctx, runs_root, run, split)
            .await?
            .last_epoch
            .is_some()
        {
            paths.push(confusion(&ctx, runs_root, run, split, out_dir).await?);
            break;
        }
    }
    Ok(paths)
}

/// A query session with the run tables of `runs_root`.
fn session(runs_root: &Path) -> Result<SessionContext> {
    let ctx = crate::query::session();
    crate::run::tables::register_tables(&ctx, runs_root)?;
    Ok(ctx)
}

/// `run` checked as a run name (so it is safe in a SQL string literal), quoted.
fn quoted_run(runs_root: &Path, run: &str) -> Result<String> {
    Run::new(runs_root, run)?;
    Ok(crate::query::literal(run))
}

/// `runs_root/run/table`, for messages.
fn table_dir(runs_root: &Path, run: &str, table: &str) -> String {
    runs_root.join(run).join(table).display().to_string()
}

/// The training rows of a run, by batch.
struct Training {
    model: String,
    epoch: Vec<f64>,
    batch: Vec<f64>,
    /// Per metric of [`CURVES`]: (per batch, running mean, rolling window).
    values: Vec<[Vec<f64>; 3]>,
    /// Batches the drift detector flagged.
    drifts: Vec<f64>,
}

async fn curves(
    ctx: &SessionContext,
    runs_root: &Path,
    run: &str,
    out_dir: &Path,
) -> Result<Vec<PathBuf>> {
    let q = quoted_run(runs_root, run)?;
    let mut columns = vec!["model".to_string(), "epoch".into(), "batch".into()];
    for c in &CURVES {
        for suffix in ["", "_mean", "_window"] {
            columns.push(format!("\"{}{suffix}\"", c.column));
        }
    }
    columns.push("CASE WHEN drift THEN 1.0 ELSE 0.0 END AS drift_flag".into());
    let sql = format!(
        "SELECT {} FROM metrics WHERE run = {q} AND split = 'train' ORDER BY batch",
        columns.join(", ")
    );
    let batches = crate::query::run(ctx, &sql).await?;
    let batch = f64_column(&batches, "batch")?;
    if batch.is_empty() {
        return Err(Error::usage(format!(
            "run {run} has no training metrics under {}",
            table_dir(runs_root, run, "metrics")
        )));
    }
    let mut values = Vec::new();
    for c in &CURVES {
        values.push([
            f64_column(&batches, c.column)?,
            f64_column(&batches, &format!("{}_mean", c.column))?,
            f64_column(&batches, &format!("{}_window", c.column))?,
        ]);
    }
    let drifts = batch
        .iter()
        .zip(f64_column(&batches, "drift_flag")?)
        .filter(|(_, f)| *f > 0.0)
        .map(|(&b, _)| b)
        .collect();
    let training = Training {
        model: string_column(&batches, "model")?.swap_remove(0),
        epoch: f64_column(&batches, "epoch")?,
        batch,
        values,
        drifts,
    };
    let test = test_scores(ctx, run).await?;

    create_out_dir(out_dir)?;
    let mut paths = Vec::new();
    for (i, c) in CURVES.iter().enumerate() {
        let path = out_dir.join(format!("{}.png", c.file));
        let test_value = test.as_ref().map(|t| t.values[i]);
        let title = format!(
            "{run} ({}): {} per batch, scored before learning",
            training.model, c.name
        );
        render(&path, CURVE_SIZE, |root| {
            draw_curve(root, &title, c.name, &training, i, test_value)
        })?;
        paths.push(path);
    }
    Ok(paths)
}

/// Image-weighted test scores of a run.
struct TestScores {
    model: String,
    images: f64,
    /// In the order of [`CURVES`].
    values: [f64; 5],
}

/// The image-weighted test scores of `run` ([`read::test_scores`]), if it has test rows.
async fn test_scores(ctx: &SessionContext, run: &str) -> Result<Option<TestScores>> {
    let found = read::test_scores(ctx, &[run]).await?;
    Ok(found.into_iter().next().map(|t| TestScores {
        values: CURVES.map(|c| t.get(c.column).unwrap_or(f64::NAN)),
        images: t.images as f64,
        model: t.model,
    }))
}

fn create_out_dir(out_dir: &Path) -> Result<()> {
    fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))
}

/// What drawing returns (plotters' errors, boxed).
type DrawResult = std::result::Result<(), Box<dyn std::error::Error>>;

/// Registers the embedded fonts with plotters, once. The text is drawn by [`Canvas`], but
/// plotters sizes legends with its own font layout.
fn register_fonts() {
    static FONTS: Once = Once::new();
    FONTS.call_once(|| {
        let regular =
            plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular());
        let bold = plotters::style::register_font(FONT, FontStyle::Bold, dejavu::sans::bold());
        debug_assert!(regular.is_ok() && bold.is_ok(), "the embedded fonts load");
    });
}

/// The drawing area of a plot.
type Area<'a> = DrawingArea<Canvas<BitMapBackend<'a>>, Shift>;

/// Draws a `size` image with `draw` onto a white background and writes it to `path` as a
/// PNG.
fn render<F>(path: &Path, (w, h): (u32, u32), draw: F) -> Result<()>
where
    F: FnOnce(&Area<'_>) -> DrawResult,
{
    register_fonts();
    let mut rgb = vec![255u8; w as usize * h as usize * 3];
    {
        let root = Canvas(BitMapBackend::with_buffer(&mut rgb, (w, h))).into_drawing_area();
        let drawn: DrawResult = root
            .fill(&WHITE)
            .map_err(Into::into)
            .and_then(|()| draw(&root))
            .and_then(|()| root.present().map_err(Into::into));
        drawn.map_err(|e| Error::io(path, std::io::Error::other(format!("drawing: {e}"))))?;
    }
    crate::store::png::write_png(path, w, h, &rgb)
}

/// A text style of the plots' font.
fn font(px: f64) -> TextStyle<'static> {
    (FONT, px).into_font().into()
}

/// A bold text style of the plots' font.
fn bold(px: f64) -> TextStyle<'static> {
    (FONT, px, FontStyle::Bold).into_font().into()
}

/// `text` at `px` (bold or not), shrunk (to 9 px at least, then cut with "…") until it is
/// at most `max_w` pixels wide on `area`.
fn fit(
    area: &Area<'_>,
    text: &str,
    px: f64,
    is_bold: bool,
    max_w: u32,
) -> (String, TextStyle<'static>) {
    let style = |px| if is_bold { bold(px) } else { font(px) };
    let width = |t: &str, s: &TextStyle| area.estimate_text_size(t, s).map_or(0, |(w, _)| w);
    let mut px = px;
    while px > 9.0 && width(text, &style(px)) > max_w {
        px -= 1.0;
    }
    let s = style(px);
    let mut t = text.to_string();
    while t.chars().count() > 1 && width(&t, &s) > max_w {
        t.pop();
        t.pop();
        t.push('…');
    }
    (t, s)
}

/// The `q`-quantile of the finite values of `v` (0 when there are none).
fn quantile(v: &[f64], q: f64) -> f64 {
    let mut f: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if f.is_empty() {
        return 0.0;
    }
    f.sort_by(f64::total_cmp);
    f[((f.len() - 1) as f64 * q).round() as usize]
}

/// Tick label text for a value axis ending at `top`.
fn tick_label(v: f64, top: f64) -> String {
    match top {
        t if t >= 20.0 => format!("{v:.0}"),
        t if t >= 2.0 => format!("{v:.1}"),
        _ => format!("{v:.2}"),
    }
}

/// Epochs of the training rows: (epoch, first batch, last batch), in batch order.
fn epoch_spans(t: &Training) -> Vec<(f64, f64, f64)> {
    let mut spans: Vec<(f64, f64, f64)> = Vec::new();
    for (&e, &b) in t.epoch.iter().zip(&t.batch) {
        match spans.last_mut() {
            Some(last) if last.0 == e => last.2 = b,
            _ => spans.push((e, b, b)),
        }
    }
    spans
}

fn draw_curve(
    root: &Area<'_>,
    title: &str,
    y_name: &str,
    t: &Training,
    metric: usize,
    test: Option<f64>,
) -> DrawResult {
    let [value, mean, window] = &t.values[metric];
    let x0 = t.batch[0];
    let x1 = t.batch[t.batch.len() - 1].max(x0 + 1.0);
    // Loss: up to its 99th percentile (and the test value), so one outlier does not
    // flatten the curve; the rest are fractions.
    let top = if CURVES[metric].column == "loss" {
        let top = quantile(value, 0.99).max(test.unwrap_or(0.0)) * 1.1;
        if top.is_finite() && top > 0.0 {
            top
        } else {
            1.0
        }
    } else {
        1.0
    };
    let (title, title_style) = fit(root, title, TITLE_PX, true, CURVE_SIZE.0 - 20);
    let mut chart = ChartBuilder::on(root)
        .caption(title, title_style)
        .margin(12)
        .margin_right(28)
        .x_label_area_size(48)
        .y_label_area_size(68)
        .build_cartesian_2d(x0..x1, 0f64..top)?;

    // Epochs: every other one shaded, each named at the top when it is wide enough.
    let spans = epoch_spans(t);
    if spans.len() > 1 {
        for (i, &(_, first, _)) in spans.iter().enumerate() {
            let end = spans.get(i + 1).map_or(x1, |s| s.1 - 0.5);
            let start = if i == 0 { x0 } else { first - 0.5 };
            if i % 2 == 1 {
                chart.draw_series(std::iter::once(Rectangle::new(
                    [(start, 0.0), (end, top)],
                    EPOCH_SHADE.filled(),
                )))?;
            }
        }
    }
    let fmt_x = |x: &f64| format!("{x:.0}");
    let fmt_y = |y: &f64| tick_label(*y, top);
    chart
        .configure_mesh()
        .x_desc("batch")
        .y_desc(y_name)
        .axis_desc_style(font(LABEL_PX))
        .label_style(font(TICK_PX))
        .x_labels(10)
        .y_labels(11)
        .x_label_formatter(&fmt_x)
        .y_label_formatter(&fmt_y)
        .light_line_style(RGBColor(246, 246, 246))
        .bold_line_style(RGBColor(222, 222, 222))
        .draw()?;
    if spans.len() > 1 {
        let label_style = font(TICK_PX).color(&RGBColor(90, 90, 90));
        for (i, &(epoch, first, _)) in spans.iter().enumerate() {
            let start = if i == 0 { x0 } else { first - 0.5 };
            let end = spans.get(i + 1).map_or(x1, |s| s.1 - 0.5);
            if i > 0 {
                chart.draw_series(std::iter::once(PathElement::new(
                    vec![(start, 0.0), (start, top)],
                    RGBColor(150, 150, 150).stroke_width(1),
                )))?;
            }
            let label = format!("epoch {epoch:.0}");
            // Along the bottom, clear of the legend (the curves rarely go that low).
            let (px0, py) = chart.backend_coord(&(start, 0.0));
            let (px1, _) = chart.backend_coord(&(end, 0.0));
            let w = root
                .estimate_text_size(&label, &label_style)
                .map_or(0, |(w, _)| w as i32);
            if px1 - px0 > w + 12 {
                root.draw(&Text::new(
                    label,
                    (px0 + 6, py - 5),
                    label_style.pos(Pos::new(HPos::Left, VPos::Bottom)),
                ))?;
            }
        }
    }

    let points = |ys: &[f64]| -> Vec<(f64, f64)> {
        t.batch
            .iter()
            .zip(ys)
            .filter(|(_, y)| y.is_finite())
            .map(|(&x, &y)| (x, y.clamp(0.0, top)))
            .collect()
    };
    let legend_line = |colour: RGBColor, width: u32| {
        move |(x, y): (i32, i32)| {
            PathElement::new(vec![(x, y), (x + 24, y)], colour.stroke_width(width))
        }
    };
    chart
        .draw_series(LineSeries::new(
            points(value),
            PER_BATCH_COLOUR.stroke_width(1),
        ))?
        .label("per batch")
        .legend(legend_line(PER_BATCH_COLOUR, 2));
    chart
        .draw_series(LineSeries::new(
            points(window),
            WINDOW_COLOUR.stroke_width(2),
        ))?
        .label("rolling window")
        .legend(legend_line(WINDOW_COLOUR, 2));
    chart
        .draw_series(LineSeries::new(points(mean), MEAN_COLOUR.stroke_width(3)))?
        .label("running mean")
        .legend(legend_line(MEAN_COLOUR, 3));
    // Drift detections: a dashed vertical line at each flagged batch.
    for (i, &b) in t.drifts.iter().enumerate() {
        let series = chart.draw_series(DashedLineSeries::new(
            vec![(b, 0.0), (b, top)],
            6,
            4,
            DRIFT_COLOUR.stroke_width(2),
        ))?;
        if i == 0 {
            series.label("drift (ADWIN)").legend(|(x, y)| {
                DashedPathElement::new(
                    vec![(x, y), (x + 24, y)],
                    6,
                    4,
                    DRIFT_COLOUR.stroke_width(2),
                )
            });
        }
    }
    if let Some(v) = test.filter(|v| v.is_finite()) {
        let y = v.clamp(0.0, top);
        chart
            .draw_series(DashedLineSeries::new(
                vec![(x0, y), (x1, y)],
                10,
                6,
                TEST_COLOUR.stroke_width(2),
            ))?
            .label(format!("test: {v:.3}"))
            .legend(|(x, y)| {
                DashedPathElement::new(vec![(x, y), (x + 24, y)], 8, 4, TEST_COLOUR.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .margin(12)
        .legend_area_size(34)
        .label_font(font(LABEL_PX))
        .background_style(WHITE.mix(0.9))
        .border_style(RGBColor(170, 170, 170))
        .draw()?;
    Ok(())
}

async fn compare(
    ctx: &SessionContext,
    runs_root: &Path,
    runs: &[String],
    out_dir: &Path,
) -> Result<Vec<PathBuf>> {
    let mut names: Vec<&str> = Vec::new();
    for r in runs {
        if !names.contains(&r.as_str()) {
            names.push(r);
        }
    }
    if names.is_empty() {
        return Err(Error::usage("no runs to compare"));
    }
    let mut scores = Vec::new();
    for run in names {
        let q = quoted_run(runs_root, run)?;
        let known = crate::query::run(
            ctx,
            &format!("SELECT count(*) AS n FROM metrics WHERE run = {q}"),
        )
        .await?;
        if f64_column(&known, "n")?.first().copied().unwrap_or(0.0) == 0.0 {
            return Err(Error::usage(format!(
                "unknown run {run}: no metrics under {}",
                table_dir(runs_root, run, "metrics")
            )));
        }
        let Some(t) = test_scores(ctx, run).await? else {
            let runs_flag = if runs_root == Path::new("runs") {
                String::new()
            } else {
                format!(" --runs {}", runs_root.display())
            };
            return Err(Error::usage(format!(
                "run {run} has no test metrics: score it first with \
                 `cifar-df predict --run {run}{runs_flag}`"
            )));
        };
        scores.push((run.to_string(), t));
    }
    create_out_dir(out_dir)?;
    let width = (170 * scores.len() as u32 + 200).max(700);
    let mut paths = Vec::new();
    for (file, what, metric) in [
        ("test_accuracy.png", "accuracy", 1),
        ("test_loss.png", "loss", 0),
    ] {
        let bars: Vec<(String, String, f64)> = scores
            .iter()
            .map(|(r, t)| (r.clone(), t.model.clone(), t.values[metric]))
            .collect();
        let images: Vec<f64> = scores.iter().map(|(_, t)| t.images).collect();
        let path = out_dir.join(file);
        render(&path, (width, BAR_HEIGHT), |root| {
            draw_bars(root, what, &bars, &images, metric != 0)
        })?;
        paths.push(path);
    }
    Ok(paths)
}

/// One bar per (run, model, value).
fn draw_bars(
    root: &Area<'_>,
    what: &str,
    bars: &[(String, String, f64)],
    images: &[f64],
    fraction: bool,
) -> DrawResult {
    let n = bars.len();
    let max = bars
        .iter()
        .map(|b| b.2)
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max);
    let top = if fraction {
        1.0
    } else if max > 0.0 {
        max * 1.15
    } else {
        1.0
    };
    let same_images = images.windows(2).all(|w| w[0] == w[1]);
    let title = if same_images {
        format!(
            "Test {what} by run ({:.0} test images each, image-weighted)",
            images[0]
        )
    } else {
        format!("Test {what} by run (image-weighted over each run's test images)")
    };
    let (w, _) = root.dim_in_pixel();
    let (title, title_style) = fit(root, &title, TITLE_PX, true, w - 20);
    let mut chart = ChartBuilder::on(root)
        .caption(title, title_style)
        .margin(12)
        .margin_right(24)
        .x_label_area_size(78)
        .y_label_area_size(68)
        .build_cartesian_2d(-0.5f64..n as f64 - 0.5, 0f64..top)?;
    let fmt_y = |y: &f64| tick_label(*y, top);
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_labels(11)
        .y_desc(format!("test {what}"))
        .axis_desc_style(font(LABEL_PX))
        .label_style(font(TICK_PX))
        .y_label_formatter(&fmt_y)
        .light_line_style(RGBColor(246, 246, 246))
        .bold_line_style(RGBColor(222, 222, 222))
        .draw()?;
    let slot = {
        let (a, _) = chart.backend_coord(&(0.0, 0.0));
        let (b, _) = chart.backend_coord(&(1.0, 0.0));
        (b - a).max(1) as u32
    };
    for (i, (run, model, v)) in bars.iter().enumerate() {
        let x = i as f64;
        let colour = BAR_COLOURS[i % BAR_COLOURS.len()];
        let h = if v.is_finite() {
            v.clamp(0.0, top)
        } else {
            0.0
        };
        chart.draw_series(std::iter::once(Rectangle::new(
            [(x - 0.32, 0.0), (x + 0.32, h)],
            colour.filled(),
        )))?;
        let (px, py) = chart.backend_coord(&(x, h));
        root.draw(&Text::new(
            format!("{v:.3}"),
            (px, py - 6),
            bold(LABEL_PX).pos(Pos::new(HPos::Center, VPos::Bottom)),
        ))?;
        let (_, base) = chart.backend_coord(&(x, 0.0));
        let (run, style) = fit(root, run, LABEL_PX, false, slot - 8);
        root.draw(&Text::new(
            run,
            (px, base + 10),
            style.pos(Pos::new(HPos::Center, VPos::Top)),
        ))?;
        let (model, style) = fit(root, model, TICK_PX, false, slot - 8);
        root.draw(&Text::new(
            model,
            (px, base + 32),
            style
                .color(&RGBColor(100, 100, 100))
                .pos(Pos::new(HPos::Center, VPos::Top)),
        ))?;
    }
    Ok(())
}

/// The confusion matrix of `run` on `split` (`[actual][predicted]`, [`read::confusion`]),
/// summed over the split's rows (for `train`, the last epoch's), and that last epoch.
async fn confusion_matrix(
    ctx: &SessionContext,
    runs_root: &Path,
    run: &str,
    split: &str,
) -> Result<(Vec<Vec<u64>>, u32)> {
    Run::new(runs_root, run)?;
    if !matches!(split, "test" | "train") {
        return Err(Error::usage(format!(
            "split {split:?}: expected test or train"
        )));
    }
    let c = read::confusion(ctx, runs_root, run, split).await?;
    match c.last_epoch {
        Some(epoch) if !c.counts.is_empty() => Ok((c.counts, epoch)),
        _ => Err(Error::usage(format!(
            "run {run} has no {split} confusion rows under {}",
            table_dir(runs_root, run, "confusion")
        ))),
    }
}

async fn confusion(
    ctx: &SessionContext,
    runs_root: &Path,
    run: &str,
    split: &str,
    out_dir: &Path,
) -> Result<PathBuf> {
    let (matrix, last_epoch) = confusion_matrix(ctx, runs_root, run, split).await?;
    let total: u64 = matrix.iter().flatten().sum();
    let correct: u64 = (0..matrix.len()).map(|i| matrix[i][i]).sum();
    let names = crate::run::tables::run_classes(runs_root, run);
    let accuracy = correct as f64 / total.max(1) as f64;
    let which = if split == "train" {
        format!("train, last epoch {last_epoch}")
    } else {
        split.to_string()
    };
    let title =
        format!("{run}: confusion matrix ({which}, {total} images, accuracy {accuracy:.3})");
    create_out_dir(out_dir)?;
    let path = out_dir.join(format!("confusion-{split}.png"));
    render(&path, HEATMAP_SIZE, |root| {
        draw_heatmap(root, &title, &matrix, &names)
    })?;
    Ok(path)
}

/// Matplotlib's "Blues", from 0 (white) to 1 (dark blue).
fn blues(f: f64) -> RGBColor {
    const STOPS: [(u8, u8, u8); 9] = [
        (247, 251, 255),
        (222, 235, 247),
        (198, 219, 239),
        (158, 202, 225),
        (107, 174, 214),
        (66, 146, 198),
        (33, 113, 181),
        (8, 81, 156),
        (8, 48, 107),
    ];
    let f = if f.is_finite() {
        f.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let pos = f * (STOPS.len() - 1) as f64;
    let i = (pos.floor() as usize).min(STOPS.len() - 2);
    let t = pos - i as f64;
    let mix = |a: u8, b: u8| (a as f64 + (b as f64 - a as f64) * t).round() as u8;
    let (a, b) = (STOPS[i], STOPS[i + 1]);
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

fn draw_heatmap(root: &Area<'_>, title: &str, matrix: &[Vec<u64>], names: &[String]) -> DrawResult {
    let (w, _) = root.dim_in_pixel();
    // 500 pixels for the matrix, whatever the number of classes; counts and names are
    // printed while a cell is large enough to hold them (up to 25 classes).
    let k = matrix.len().max(1) as i32;
    let cell = (500 / k).max(1);
    let (left, top) = (165i32, 68i32);
    let (right, bottom) = (left + k * cell, top + k * cell);
    let labelled = cell >= 20;
    let (title, title_style) = fit(root, title, TITLE_PX, true, w - 20);
    root.draw(&Text::new(
        title,
        (w as i32 / 2, 14),
        title_style.pos(Pos::new(HPos::Center, VPos::Top)),
    ))?;

    // Cells: colour by the fraction of the actual class (the row), count printed.
    for (a, row) in matrix.iter().enumerate() {
        let row_total: u64 = row.iter().sum();
        for (p, &c) in row.iter().enumerate() {
            let f = c as f64 / row_total.max(1) as f64;
            let (x, y) = (left + p as i32 * cell, top + a as i32 * cell);
            root.draw(&Rectangle::new(
                [(x, y), (x + cell, y + cell)],
                blues(f).filled(),
            ))?;
            let colour = match (c, f > 0.5) {
                (0, _) => RGBColor(170, 170, 170),
                (_, true) => WHITE,
                (_, false) => BLACK,
            };
            if !labelled {
                continue;
            }
            let (text, style) = fit(root, &c.to_string(), TICK_PX, false, cell as u32 - 4);
            root.draw(&Text::new(
                text,
                (x + cell / 2, y + cell / 2),
                style
                    .color(&colour)
                    .pos(Pos::new(HPos::Center, VPos::Center)),
            ))?;
        }
    }
    root.draw(&Rectangle::new(
        [(left, top), (right, bottom)],
        RGBColor(120, 120, 120).stroke_width(1),
    ))?;

    // Class names: rows on the left, columns below (vertical).
    for (i, name) in names.iter().enumerate().filter(|_| labelled) {
        let c = i as i32 * cell + cell / 2;
        root.draw(&Text::new(
            name.to_string(),
            (left - 8, top + c),
            font(LABEL_PX).pos(Pos::new(HPos::Right, VPos::Center)),
        ))?;
        root.draw(&Text::new(
            name.to_string(),
            (left + c, bottom + 8),
            font(LABEL_PX)
                .transform(FontTransform::Rotate270)
                .pos(Pos::new(HPos::Right, VPos::Center)),
        ))?;
    }
    root.draw(&Text::new(
        "actual",
        (22, (top + bottom) / 2),
        bold(LABEL_PX)
            .transform(FontTransform::Rotate270)
            .pos(Pos::new(HPos::Center, VPos::Center)),
    ))?;
    root.draw(&Text::new(
        "predicted",
        ((left + right) / 2, bottom + 104),
        bold(LABEL_PX).pos(Pos::new(HPos::Center, VPos::Top)),
    ))?;

    // Colour scale.
    let (bx0, bx1) = (right + 30, right + 50);
    root.draw(&Rectangle::new(
        [(bx0 - 1, top - 1), (bx1, bottom)],
        RGBColor(120, 120, 120).stroke_width(1),
    ))?;
    for y in top..bottom {
        let f = (bottom - 1 - y) as f64 / (bottom - top - 1) as f64;
        root.draw(&PathElement::new(vec![(bx0, y), (bx1 - 1, y)], blues(f)))?;
    }
    for k in 0..=4 {
        let f = k as f64 / 4.0;
        let y = bottom - 1 - (f * (bottom - top - 1) as f64).round() as i32;
        root.draw(&PathElement::new(vec![(bx1, y), (bx1 + 5, y)], BLACK))?;
        root.draw(&Text::new(
            format!("{f:.2}"),
            (bx1 + 8, y),
            font(TICK_PX).pos(Pos::new(HPos::Left, VPos::Center)),
        ))?;
    }
    root.draw(&Text::new(
        "fraction of the actual class",
        (bx1 + 62, (top + bottom) / 2),
        font(LABEL_PX)
            .transform(FontTransform::Rotate270)
            .pos(Pos::new(HPos::Center, VPos::Center)),
    ))?;
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    use std::collections::HashSet;

    use crate::run::metrics::{Metrics, Running};
    use crate::run::tables::MetricsRow;

    /// Batches in the rolling window of the fixtures.
    const W: usize = 5;

    /// One metrics row: split, epoch, batch, images, (acc, loss, precision, recall, f1).
    type Row = (&'static str, u32, u64, u64, [f64; 5]);

    /// The run store's rows for `rows` (one split): the given rates, running means and
    /// windows of `W`, and a confusion matrix of `images` spread over the cells.
    fn metrics_rows(rows: &[Row]) -> Vec<MetricsRow> {
        let mut running = Running::new(W);
        rows.iter()
            .map(
                |&(split, epoch, batch, images, [acc, loss, precision, recall, f1])| {
                    let mut confusion = vec![vec![0u64; 10]; 10];
                    for (a, p, c) in confusion_cells(images, batch) {
                        confusion[a as usize][p as usize] = c;
                    }
                    let metrics = Metrics {
                        images,
                        acc,
                        loss,
                        precision,
                        recall,
                        f1,
                        confusion,
                    };
                    let (mean, window) = running.push(&metrics);
                    MetricsRow {
                        split: split.into(),
                        epoch,
                        batch,
                        metrics,
                        mean,
                        window,
                        seconds: 0.01,
                        ts_ms: 1_700_000_000_000,
                        drift: false,
                    }
                },
            )
            .collect()
    }

    /// Nonzero cells (actual, predicted, count) of a batch of `images` (a multiple of 10).
    fn confusion_cells(images: u64, seed: u64) -> Vec<(u8, u8, u64)> {
        let per_class = images / 10;
        let mut cells = Vec::new();
        for a in 0..10u8 {
            let right = per_class * (3 + (a as u64 + seed) % 6) / 10;
            let wrong = per_class - right;
            cells.push((a, a, right));
            let other = (a + 1 + (seed % 9) as u8) % 10;
            let other = if other == a { (a + 1) % 10 } else { other };
            if wrong > 0 {
                cells.push((a, other, wrong));
            }
        }
        cells.retain(|c| c.2 > 0);
        cells
    }

    /// Training rows: `epochs` × `per_epoch` batches of 100 images, accuracy rising with
    /// noise, the loss falling with one outlier.
    fn train_rows(epochs: u32, per_epoch: u64) -> Vec<Row> {
        let total = epochs as u64 * per_epoch;
        let mut rows = Vec::new();
        for k in 0..total {
            let p = k as f64 / (total - 1).max(1) as f64;
            let acc = (0.15 + 0.3 * p + 0.08 * (k as f64 * 1.7).sin()).clamp(0.0, 1.0);
            let loss = if k == 3 {
                6.0
            } else {
                2.3 - 0.8 * p + 0.3 * (k as f64 * 2.3).sin().powi(2)
            };
            let epoch = 1 + (k / per_epoch) as u32;
            rows.push((
                "train",
                epoch,
                k,
                100,
                [acc, loss, acc * 0.95, acc, acc * 0.97],
            ));
        }
        rows
    }

    /// Test rows: 100 + 100 + 50 images at accuracy 0.40, 0.44, 0.30 (weighted: 0.396).
    fn test_rows() -> Vec<Row> {
        [(0, 100, 0.40, 1.6), (1, 100, 0.44, 1.5), (2, 50, 0.30, 1.9)]
            .iter()
            .map(|&(b, n, acc, loss)| ("test", 1, b, n, [acc, loss, acc, acc, acc]))
            .collect()
    }

    /// Writes a fixture run under `root`: `epochs` × 20 training batches (with confusion
    /// rows per batch), and when `with_test`, test metrics and confusion rows.
    pub(crate) fn write_fixture_run(
        root: &Path,
        run: &str,
        model: &str,
        epochs: u32,
        with_test: bool,
    ) {
        let r = Run::new(root, run).unwrap();
        let train = metrics_rows(&train_rows(epochs, 20));
        let file = "part-0000000000001-000.parquet";
        r.write_part("metrics", file, &r.metrics_batch(model, &train).unwrap())
            .unwrap();
        r.write_part("confusion", file, &r.confusion_batch(&train).unwrap())
            .unwrap();
        if with_test {
            let test = metrics_rows(&test_rows());
            let file = "part-0000000000002-000.parquet";
            r.write_part(
                "eval_metrics",
                file,
                &r.metrics_batch(model, &test).unwrap(),
            )
            .unwrap();
            r.write_part("confusion", file, &r.confusion_batch(&test).unwrap())
                .unwrap();
        }
    }

    /// (width, height, RGB pixels) of a PNG file.
    fn decode(path: &Path) -> (u32, u32, Vec<u8>) {
        let bytes = fs::read(path).unwrap();
        let mut reader = png::Decoder::new(std::io::Cursor::new(bytes))
            .read_info()
            .unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        buf.truncate(info.buffer_size());
        assert_eq!(info.color_type, png::ColorType::Rgb, "{}", path.display());
        (info.width, info.height, buf)
    }

    fn pixels_of(rgb: &[u8], c: RGBColor) -> usize {
        rgb.chunks_exact(3)
            .filter(|p| p[0] == c.0 && p[1] == c.1 && p[2] == c.2)
            .count()
    }

    fn distinct_colours(rgb: &[u8]) -> usize {
        rgb.chunks_exact(3)
            .map(|p| [p[0], p[1], p[2]])
            .collect::<HashSet<_>>()
            .len()
    }

    #[tokio::test]
    async fn plot_run_writes_five_curves_with_means_windows_and_test_line() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("runs");
        write_fixture_run(&root, "a", "logreg", 2, true);
        let out = tmp.path().join("plots");
        let paths = plot_run(&root, "a", &out).await.unwrap();
        let names: Vec<String> = paths
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "loss.png",
                "accuracy.png",
                "precision.png",
                "recall.png",
                "f1.png"
            ]
        );
        for p in &paths {
            assert_eq!(p.parent().unwrap(), out);
            let (w, h, rgb) = decode(p);
            assert_eq!((w, h), CURVE_SIZE, "{}", p.display());
            assert!(distinct_colours(&rgb) > 50, "{} looks blank", p.display());
            assert!(
                pixels_of(&rgb, MEAN_COLOUR) > 300,
                "{}: no running mean",
                p.display()
            );
            assert!(
                pixels_of(&rgb, WINDOW_COLOUR) > 200,
                "{}: no window",
                p.display()
            );
            assert!(
                pixels_of(&rgb, PER_BATCH_COLOUR) > 80,
                "{}: no per-batch line",
                p.display()
            );
            assert!(
                pixels_of(&rgb, TEST_COLOUR) > 100,
                "{}: no test line",
                p.display()
            );
            assert!(
                pixels_of(&rgb, EPOCH_SHADE) > 10_000,
                "{}: no epoch shading",
                p.display()
            );
        }
    }

    #[tokio::test]
    async fn plot_run_without_test_rows_or_second_epoch_draws_no_test_line_or_shading() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("runs");
        write_fixture_run(&root, "solo", "mlp", 1, false);
        let paths = plot_run(&root, "solo", &tmp.path().join("p"))
            .await
            .unwrap();
        assert_eq!(paths.len(), 5);
        let (_, _, rgb) = decode(&paths[1]);
        assert!(pixels_of(&rgb, MEAN_COLOUR) > 300);
        assert_eq!(pixels_of(&rgb, TEST_COLOUR), 0);
        assert_eq!(pixels_of(&rgb, EPOCH_SHADE), 0);
    }

    #[tokio::test]
    async fn plot_run_without_training_rows_is_an_error_naming_the_run() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("runs");
        write_fixture_run(&root, "a", "logreg", 1, true);
        let e = plot_run(&root, "ghost", tmp.path())
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("run ghost has no training metrics"), "{e}");
        assert!(e.contains("ghost/metrics"), "{e}");
        let e = plot_run(&root, "no'quote", tmp.path())
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("run name"), "{e}");
    }

    #[tokio::test]
    async fn test_scores_are_weighted_by_images() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("runs");
        write_fixture_run(&root, "a", "logreg", 1, true);
        let ctx = session(&root).unwrap();
        let t = test_scores(&ctx, "a").await.unwrap().unwrap();
        assert_eq!(t.images, 250.0);
        assert!((t.values[1] - 0.396).abs() < 1e-12, "{}", t.values[1]);
        assert!((t.values[0] - (160.0 + 150.0 + 95.0) / 250.0).abs() < 1e-12);
        assert_eq!(t.model, "logreg");
        assert!(test_scores(&ctx, "nope").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn plot_compare_draws_one_bar_per_run() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("runs");
        write_fixture_run(&root, "a", "logreg", 1, true);
        write_fixture_run(&root, "b-with-a-long-name", "mlp", 2, true);
        let out = tmp.path().join("cmp");
        let runs = vec!["a".to_string(), "b-with-a-long-name".to_string()];
        let paths = plot_compare(&root, &runs, &out).await.unwrap();
        assert_eq!(
            paths,
            [out.join("test_accuracy.png"), out.join("test_loss.png")]
        );
        for p in &paths {
            let (w, h, rgb) = decode(p);
            assert_eq!((w, h), (700, BAR_HEIGHT));
            assert!(distinct_colours(&rgb) > 20, "{} looks blank", p.display());
            for c in &BAR_COLOURS[..2] {
                assert!(
                    pixels_of(&rgb, *c) > 5_000,
                    "{}: missing a bar",
                    p.display()
                );
            }
            assert_eq!(pixels_of(&rgb, BAR_COLOURS[2]), 0, "{}", p.display());
        }
    }

    #[tokio::test]
    async fn plot_compare_errors_name_the_run() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("runs");
        write_fixture_run(&root, "a", "logreg", 1, true);
        write_fixture_run(&root, "untested", "svm", 1, false);
        let out = tmp.path().join("cmp");
        let e = plot_compare(&root, &["a".into(), "untested".into()], &out)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("run untested has no test metrics"), "{e}");
        assert!(e.contains("cifar-df predict --run untested"), "{e}");
        let e = plot_compare(&root, &["a".into(), "nope".into()], &out)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown run nope"), "{e}");
        assert!(!out.join("test_accuracy.png").exists());
        let e = plot_compare(&root, &[], &out)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("no runs"), "{e}");
    }

    #[tokio::test]
    async fn confusion_matrix_sums_test_rows_and_the_last_training_epoch() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("runs");
        write_fixture_run(&root, "a", "logreg", 3, true);
        let ctx = session(&root).unwrap();
        let (m, _) = confusion_matrix(&ctx, &root, "a", "test").await.unwrap();
        assert_eq!(m.iter().flatten().sum::<u64>(), 250);
        let mut expected = [[0u64; 10]; 10];
        for (b, n) in [(0, 100), (1, 100), (2, 50)] {
            for (a, p, c) in confusion_cells(n, b) {
                expected[a as usize][p as usize] += c;
            }
        }
        assert_eq!(m, expected);
        let (m, epoch) = confusion_matrix(&ctx, &root, "a", "train").await.unwrap();
        assert_eq!(epoch, 3);
        // 20 batches of 100 images in the last epoch, not 60.
        assert_eq!(m.iter().flatten().sum::<u64>(), 2_000);
    }

    #[tokio::test]
    async fn plot_confusion_draws_test_and_train_heatmaps() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("runs");
        write_fixture_run(&root, "a", "logreg", 2, true);
        let out = tmp.path().join("heat");
        for split in ["test", "train"] {
            let p = plot_confusion(&root, "a", split, &out).await.unwrap();
            assert_eq!(p, out.join(format!("confusion-{split}.png")));
            let (w, h, rgb) = decode(&p);
            assert_eq!((w, h), HEATMAP_SIZE);
            assert!(distinct_colours(&rgb) > 50, "{} looks blank", p.display());
            // The colour scale's ends.
            assert!(pixels_of(&rgb, blues(1.0)) >= 10, "{}", p.display());
            assert!(pixels_of(&rgb, blues(0.0)) >= 10, "{}", p.display());
        }
    }

    #[tokio::test]
    async fn plot_confusion_without_rows_names_run_and_split() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("runs");
        write_fixture_run(&root, "a", "logreg", 1, false);
        let e = plot_confusion(&root, "a", "test", tmp.path())
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("run a has no test confusion rows"), "{e}");
        let e = plot_confusion(&root, "b", "train", tmp.path())
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("run b has no train confusion rows"), "{e}");
        let e = plot_confusion(&root, "a", "valid", tmp.path())
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("expected test or train"), "{e}");
    }

    #[tokio::test]
    async fn plot_all_for_run_prefers_the_test_confusion() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("runs");
        write_fixture_run(&root, "tested", "logreg", 1, true);
        write_fixture_run(&root, "trained", "logreg", 1, false);
        let out = tmp.path().join("t1");
        let paths = plot_all_for_run(&root, "tested", &out).await.unwrap();
        assert_eq!(paths.len(), 6);
        assert_eq!(paths[5], out.join("confusion-test.png"));
        let out = tmp.path().join("t2");
        let paths = plot_all_for_run(&root, "trained", &out).await.unwrap();
        assert_eq!(paths[5], out.join("confusion-train.png"));
        for p in paths {
            assert!(p.is_file());
        }
    }

    #[test]
    fn quantile_and_colour_scale() {
        let v: Vec<f64> = (0..=100).map(f64::from).chain([f64::NAN]).collect();
        assert_eq!(quantile(&v, 0.99), 99.0);
        assert_eq!(quantile(&[], 0.5), 0.0);
        assert_eq!(blues(0.0), RGBColor(247, 251, 255));
        assert_eq!(blues(1.0), RGBColor(8, 48, 107));
        assert_eq!(blues(f64::NAN), blues(0.0));
        let mid = blues(0.5);
        assert_eq!(mid, RGBColor(107, 174, 214));
    }
}
