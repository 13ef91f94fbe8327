//! Line charts as hand-written SVG: no font or image libraries, so the report builds anywhere.

use std::fmt::Write;

pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    pub dashed: bool,
}

const W: f64 = 720.0;
const H: f64 = 420.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 190.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 55.0;
const COLORS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
];

/// A round upper bound for an axis (1, 2 or 5 times a power of ten).
fn nice_max(max: f64) -> f64 {
    if max <= 0.0 || !max.is_finite() {
        return 1.0;
    }
    let p = 10f64.powf(max.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * p)
        .find(|v| *v >= max)
        .unwrap_or(10.0 * p)
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// How the x axis is laid out.
#[derive(Clone, Copy, PartialEq)]
pub enum XAxis {
    /// 0 to a round maximum, five ticks (milliseconds).
    Round,
    /// 0 to the largest x, a tick at each integer (concurrent sessions).
    Integer,
}

/// `step`: draw each series as a staircase (a CDF).
pub fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    step: bool,
    x_axis: XAxis,
    y_max: Option<f64>,
) -> String {
    let all = || series.iter().flat_map(|s| s.points.iter());
    let largest_x = all().map(|p| p.0).fold(0.0, f64::max);
    let (x_max, x_ticks) = match x_axis {
        XAxis::Round => (nice_max(largest_x), 5),
        XAxis::Integer => {
            let m = largest_x.ceil().max(1.0);
            (m, m as usize)
        }
    };
    let y_max = y_max.unwrap_or_else(|| nice_max(all().map(|p| p.1).fold(0.0, f64::max)));
    let (pw, ph) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
    let sx = |x: f64| LEFT + x / x_max * pw;
    let sy = |y: f64| TOP + ph - y / y_max * ph;
    let mut s = String::new();
    let _ = write!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">
<rect width="{W}" height="{H}" fill="white"/>
<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>
"##,
        LEFT + pw / 2.0,
        esc(title)
    );
    for i in 0..=x_ticks {
        let fx = x_max * i as f64 / x_ticks as f64;
        let _ = writeln!(
            s,
            r##"<line x1="{x}" y1="{TOP}" x2="{x}" y2="{b}" stroke="#e5e5e5"/><text x="{x}" y="{tb}" text-anchor="middle">{fx}</text>"##,
            x = sx(fx),
            b = TOP + ph,
            tb = TOP + ph + 16.0,
            fx = trim_num(fx),
        );
    }
    for i in 0..=5 {
        let fy = y_max * i as f64 / 5.0;
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{y}" x2="{r}" y2="{y}" stroke="#e5e5e5"/><text x="{tl}" y="{ty}" text-anchor="end">{fy}</text>"##,
            y = sy(fy),
            r = LEFT + pw,
            tl = LEFT - 6.0,
            ty = sy(fy) + 4.0,
            fy = trim_num(fy),
        );
    }
    let _ = write!(
        s,
        r##"<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>
<text x="{}" y="{}" text-anchor="middle">{}</text>
<text x="16" y="{}" text-anchor="middle" transform="rotate(-90 16 {})">{}</text>
"##,
        LEFT + pw / 2.0,
        H - 14.0,
        esc(x_label),
        TOP + ph / 2.0,
        TOP + ph / 2.0,
        esc(y_label)
    );
    for (i, ser) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let mut pts = Vec::new();
        let mut prev: Option<(f64, f64)> = None;
        for &(x, y) in &ser.points {
            let y = y.min(y_max);
            if step {
                if let Some((_, py)) = prev {
                    pts.push(format!("{:.1},{:.1}", sx(x.min(x_max)), sy(py)));
                }
            }
            pts.push(format!("{:.1},{:.1}", sx(x.min(x_max)), sy(y)));
            prev = Some((x, y));
        }
        let dash = if ser.dashed {
            r#" stroke-dasharray="6 4""#
        } else {
            ""
        };
        let _ = writeln!(
            s,
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"{dash}/>"#,
            pts.join(" ")
        );
        if !step {
            for &(x, y) in &ser.points {
                let _ = writeln!(
                    s,
                    r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{color}"/>"#,
                    sx(x),
                    sy(y.min(y_max))
                );
            }
        }
        let ly = TOP + 10.0 + i as f64 * 20.0;
        let lx = LEFT + pw + 12.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="2"{dash}/><text x="{}" y="{}">{}</text>"#,
            lx + 22.0,
            lx + 28.0,
            ly + 4.0,
            esc(&ser.name)
        );
    }
    s.push_str("</svg>\n");
    s
}

fn trim_num(v: f64) -> String {
    if (v - v.round()).abs() < 1e-9 {
        format!("{}", v.round() as i64)
    } else {
        format!("{v:.2}")
    }
}

/// The empirical CDF of `values`: (value, fraction at or below it).
pub fn cdf_points(values: &[f64]) -> Vec<(f64, f64)> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    let n = v.len() as f64;
    let mut pts = vec![(0.0, 0.0)];
    pts.extend(v.iter().enumerate().map(|(i, x)| (*x, (i + 1) as f64 / n)));
    pts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axes_round_up_and_charts_are_well_formed() {
        assert_eq!(nice_max(730.0), 1000.0);
        assert_eq!(nice_max(1.2), 2.0);
        let svg = line_chart(
            "t <1>",
            "ms",
            "fraction",
            &[Series {
                name: "v2v".into(),
                points: cdf_points(&[300.0, 500.0]),
                dashed: false,
            }],
            true,
            XAxis::Round,
            Some(1.0),
        );
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("t &lt;1&gt;"));
    }
}
