//! A plotters drawing backend that draws text itself.
//!
//! [`Canvas`] wraps plotters' bitmap backend and draws text with ab_glyph, from the
//! DejaVu Sans embedded by the `dejavu` crate. plotters' own ab_glyph text drawing places
//! each glyph without its left side bearing, so letters come out unevenly spaced (the
//! point of "0.396" against the 0, "1" too far left); here every glyph is positioned by
//! the font's metrics (advance, kerning, bearings) and rasterised with anti-aliasing.

use std::sync::OnceLock;

use ab_glyph::{point, Font, FontRef, Glyph, PxScale, ScaleFont};
use plotters::prelude::DrawingBackend;
use plotters::style::text_anchor::{HPos, VPos};
use plotters::style::FontStyle;
use plotters_backend::{
    BackendColor, BackendCoord, BackendStyle, BackendTextStyle, DrawingErrorKind,
};

/// The embedded DejaVu Sans, regular and bold, parsed once.
fn faces() -> &'static (FontRef<'static>, FontRef<'static>) {
    static FACES: OnceLock<(FontRef<'static>, FontRef<'static>)> = OnceLock::new();
    FACES.get_or_init(|| {
        let parse = |bytes: &'static [u8]| {
            FontRef::try_from_slice(bytes).expect("the embedded DejaVu Sans parses")
        };
        (parse(dejavu::sans::regular()), parse(dejavu::sans::bold()))
    })
}

/// `text` in `style` laid out on one line, its box's top-left corner at (0, 0): the font,
/// the glyphs and the box's width and height (ascent to descent) in pixels.
fn layout<S: BackendTextStyle>(
    text: &str,
    style: &S,
) -> (&'static FontRef<'static>, Vec<Glyph>, f32, f32) {
    let (regular, bold) = faces();
    let font = if matches!(style.style(), FontStyle::Bold) {
        bold
    } else {
        regular
    };
    let scale = PxScale::from(style.size() as f32);
    let scaled = font.as_scaled(scale);
    let (mut x, mut prev, mut glyphs) = (0.0, None, Vec::new());
    for c in text.chars() {
        let id = scaled.glyph_id(c);
        if let Some(p) = prev {
            x += scaled.kern(p, id);
        }
        glyphs.push(id.with_scale_and_position(scale, point(x, scaled.ascent())));
        x += scaled.h_advance(id);
        prev = Some(id);
    }
    (font, glyphs, x, scaled.ascent() - scaled.descent())
}

/// A drawing backend `B` (plotters' bitmap backend) whose text is drawn by [`layout`] and
/// ab_glyph; everything else is `B`'s.
pub(super) struct Canvas<B>(pub(super) B);

impl<B: DrawingBackend> DrawingBackend for Canvas<B> {
    type ErrorType = B::ErrorType;

    fn get_size(&self) -> (u32, u32) {
        self.0.get_size()
    }

    fn ensure_prepared(&mut self) -> std::result::Result<(), DrawingErrorKind<B::ErrorType>> {
        self.0.ensure_prepared()
    }

    fn present(&mut self) -> std::result::Result<(), DrawingErrorKind<B::ErrorType>> {
        self.0.present()
    }

    fn draw_pixel(
        &mut self,
        point: BackendCoord,
        color: BackendColor,
    ) -> std::result::Result<(), DrawingErrorKind<B::ErrorType>> {
        self.0.draw_pixel(point, color)
    }

    fn draw_line<S: BackendStyle>(
        &mut self,
        from: BackendCoord,
        to: BackendCoord,
        style: &S,
    ) -> std::result::Result<(), DrawingErrorKind<B::ErrorType>> {
        self.0.draw_line(from, to, style)
    }

    fn draw_rect<S: BackendStyle>(
        &mut self,
        upper_left: BackendCoord,
        bottom_right: BackendCoord,
        style: &S,
        fill: bool,
    ) -> std::result::Result<(), DrawingErrorKind<B::ErrorType>> {
        self.0.draw_rect(upper_left, bottom_right, style, fill)
    }

    fn draw_path<S: BackendStyle, I: IntoIterator<Item = BackendCoord>>(
        &mut self,
        path: I,
        style: &S,
    ) -> std::result::Result<(), DrawingErrorKind<B::ErrorType>> {
        self.0.draw_path(path, style)
    }

    fn draw_circle<S: BackendStyle>(
        &mut self,
        center: BackendCoord,
        radius: u32,
        style: &S,
        fill: bool,
    ) -> std::result::Result<(), DrawingErrorKind<B::ErrorType>> {
        self.0.draw_circle(center, radius, style, fill)
    }

    fn fill_polygon<S: BackendStyle, I: IntoIterator<Item = BackendCoord>>(
        &mut self,
        vert: I,
        style: &S,
    ) -> std::result::Result<(), DrawingErrorKind<B::ErrorType>> {
        self.0.fill_polygon(vert, style)
    }

    fn blit_bitmap(
        &mut self,
        pos: BackendCoord,
        size: (u32, u32),
        src: &[u8],
    ) -> std::result::Result<(), DrawingErrorKind<B::ErrorType>> {
        self.0.blit_bitmap(pos, size, src)
    }

    fn draw_text<S: BackendTextStyle>(
        &mut self,
        text: &str,
        style: &S,
        pos: BackendCoord,
    ) -> std::result::Result<(), DrawingErrorKind<B::ErrorType>> {
        let colour = style.color();
        if colour.alpha == 0.0 {
            return Ok(());
        }
        let (font, glyphs, w, h) = layout(text, style);
        let anchor = style.anchor();
        let dx = match anchor.h_pos {
            HPos::Left => 0.0,
            HPos::Center => -w / 2.0,
            HPos::Right => -w,
        };
        let dy = match anchor.v_pos {
            VPos::Top => 0.0,
            VPos::Center => -h / 2.0,
            VPos::Bottom => -h,
        };
        let transform = style.transform();
        for mut glyph in glyphs {
            glyph.position = point(glyph.position.x + dx, glyph.position.y + dy);
            let Some(outline) = font.outline_glyph(glyph) else {
                continue;
            };
            let bounds = outline.px_bounds();
            let mut drawn = Ok(());
            outline.draw(|gx, gy, coverage| {
                if drawn.is_err() || coverage <= 0.0 {
                    return;
                }
                let (x, y) = transform.transform(
                    bounds.min.x as i32 + gx as i32,
                    bounds.min.y as i32 + gy as i32,
                );
                let colour = BackendColor {
                    alpha: colour.alpha * f64::from(coverage.min(1.0)),
                    rgb: colour.rgb,
                };
                drawn = self.0.draw_pixel((pos.0 + x, pos.1 + y), colour);
            });
            drawn?;
        }
        Ok(())
    }

    fn estimate_text_size<S: BackendTextStyle>(
        &self,
        text: &str,
        style: &S,
    ) -> std::result::Result<(u32, u32), DrawingErrorKind<B::ErrorType>> {
        let (_, _, w, h) = layout(text, style);
        Ok((w.ceil() as u32, h.ceil() as u32))
    }
}
