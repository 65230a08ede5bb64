//! A test-only stand-in for the AMX tile unit, so that the AMX kernels' machine code is
//! tested on CPUs without AMX: a `SIGILL` handler decodes the faulting instruction and,
//! where it is one of the tile instructions the kernels use, carries it out as Intel's
//! Software Developer's Manual (volume 2, "LDTILECFG", "TILELOADD", "TILESTORED",
//! "TILEZERO", "TILERELEASE", "TDPBF16PS") specifies, on per-thread tile registers, and
//! resumes after it. It also raises the manual's `#UD` and `#GP` conditions (a bad
//! configuration, a tile used unconfigured, shapes that do not match) as a test failure
//! (the process aborts, naming the instruction and the rule).
//!
//! Where the CPU has AMX and Linux lends the tile state, the instructions run on the CPU
//! and the handler is never called.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Once;

/// Tile instructions carried out by the stand-in (all threads).
pub static EMULATED: AtomicUsize = AtomicUsize::new(0);
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// Installs the handler (once per process); where the CPU runs AMX, it is never called.
/// Also asks Linux for the tile state where the CPU has AMX.
pub fn install() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = super::available();
        // SAFETY: a plain SA_SIGINFO handler for SIGILL; the handler only touches its
        // thread's tile registers, the faulting context and the memory the instruction
        // names.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigill as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut sa.sa_mask);
            assert_eq!(
                libc::sigaction(libc::SIGILL, &sa, std::ptr::null_mut()),
                0,
                "sigaction"
            );
        }
        INSTALLED.store(true, Ordering::SeqCst);
    });
}

/// Whether [`install`] has run.
pub fn installed() -> bool {
    INSTALLED.load(Ordering::SeqCst)
}

/// Whether the kernels run on the CPU's own tiles (else on the stand-in), for the tests'
/// messages.
pub fn native() -> bool {
    super::available()
}

/// One thread's tile state (palette 1: eight tiles of up to 16 rows × 64 bytes).
struct State {
    configured: bool,
    rows: [u8; 8],
    colsb: [u16; 8],
    data: [[u8; 1024]; 8],
}

thread_local! {
    static STATE: UnsafeCell<State> = const {
        UnsafeCell::new(State { configured: false, rows: [0; 8], colsb: [0; 8], data: [[0; 1024]; 8] })
    };
}

extern "C" fn on_sigill(_sig: libc::c_int, _info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes the faulting thread's context; its RIP points at the
    // instruction that raised #UD, readable code.
    unsafe {
        let uc = &mut *(ctx as *mut libc::ucontext_t);
        let gregs = &mut uc.uc_mcontext.gregs;
        let rip = gregs[libc::REG_RIP as usize] as usize;
        let result = STATE.with(|s| step(rip as *const u8, gregs, &mut *s.get()));
        match result {
            Ok(len) => {
                EMULATED.fetch_add(1, Ordering::Relaxed);
                gregs[libc::REG_RIP as usize] += len as i64;
            }
            Err(why) => {
                let msg = format!("AMX stand-in: at {rip:#x}: {why}\n");
                libc::write(2, msg.as_ptr().cast(), msg.len());
                libc::abort();
            }
        }
    }
}

/// The value of general register `r` (0 = rax … 15 = r15) in the saved context.
fn reg(g: &[libc::greg_t], r: usize) -> u64 {
    let at = [
        libc::REG_RAX,
        libc::REG_RCX,
        libc::REG_RDX,
        libc::REG_RBX,
        libc::REG_RSP,
        libc::REG_RBP,
        libc::REG_RSI,
        libc::REG_RDI,
        libc::REG_R8,
        libc::REG_R9,
        libc::REG_R10,
        libc::REG_R11,
        libc::REG_R12,
        libc::REG_R13,
        libc::REG_R14,
        libc::REG_R15,
    ][r];
    g[at as usize] as u64
}

/// A memory operand: `base + disp` and, for the tile loads and stores, the stride
/// (`index << scale`).
struct Mem {
    addr: u64,
    stride: u64,
    sib: bool,
}

/// Carries out the instruction at `p`; its length, or why it cannot.
///
/// # Safety
/// `p` points at readable code; the memory an instruction names is the program's.
unsafe fn step(p: *const u8, g: &[libc::greg_t], s: &mut State) -> Result<usize, String> {
    let byte = |i: usize| *p.add(i);
    if byte(0) != 0xc4 {
        return Err(format!(
            "not a tile instruction (first byte {:#04x})",
            byte(0)
        ));
    }
    let (b1, b2) = (byte(1), byte(2));
    // VEX: R̄ X̄ B̄ m-mmmm, then W v̄v̄v̄v̄ L pp.
    let rx = usize::from((!b1 >> 7) & 1);
    let xx = usize::from((!b1 >> 6) & 1);
    let bx = usize::from((!b1 >> 5) & 1);
    let map = b1 & 0x1f;
    let (w, vvvv, l, pp) = (
        b2 >> 7,
        usize::from((!b2 >> 3) & 0xf),
        (b2 >> 2) & 1,
        b2 & 3,
    );
    let (op, modrm) = (byte(3), byte(4));
    if map != 2 || w != 0 || l != 0 {
        return Err(format!("not a tile instruction (VEX {b1:#04x} {b2:#04x})"));
    }
    let md = modrm >> 6;
    let reg_f = usize::from((modrm >> 3) & 7) | (rx << 3);
    let rm = usize::from(modrm & 7) | (bx << 3);
    let mut len = 5;
    let mem = if md == 3 {
        None
    } else {
        let (mut addr, mut stride, mut sib, mut rip_rel) = (0u64, 0u64, false, false);
        if modrm & 7 == 4 {
            sib = true;
            let sb = byte(5);
            len += 1;
            let index = usize::from((sb >> 3) & 7) | (xx << 3);
            if index != 4 {
                stride = reg(g, index) << (sb >> 6);
            }
            if !(md == 0 && sb & 7 == 5) {
                addr = reg(g, usize::from(sb & 7) | (bx << 3));
            } else {
                // No base: a 32-bit displacement follows.
                addr = i64::from(i32::from_le_bytes([
                    byte(len),
                    byte(len + 1),
                    byte(len + 2),
                    byte(len + 3),
                ])) as u64;
                len += 4;
            }
        } else if md == 0 && modrm & 7 == 5 {
            rip_rel = true;
        } else {
            addr = reg(g, rm);
        }
        match md {
            1 => {
                addr = addr.wrapping_add(i64::from(byte(len) as i8) as u64);
                len += 1;
            }
            2 => {
                let d =
                    i32::from_le_bytes([byte(len), byte(len + 1), byte(len + 2), byte(len + 3)]);
                addr = addr.wrapping_add(i64::from(d) as u64);
                len += 4;
            }
            _ => {}
        }
        if rip_rel {
            let d = i32::from_le_bytes([byte(len), byte(len + 1), byte(len + 2), byte(len + 3)]);
            len += 4;
            addr = (p as u64)
                .wrapping_add(len as u64)
                .wrapping_add(i64::from(d) as u64);
        }
        Some(Mem { addr, stride, sib })
    };
    let tile = |r: usize| -> Result<usize, String> {
        if r >= 8 {
            return Err(format!("tmm{r} does not exist (#UD)"));
        }
        Ok(r)
    };
    match (op, pp, mem) {
        // LDTILECFG m512 (VEX.128.NP.0F38.W0 49 !(11):000:bbb).
        (0x49, 0, Some(m)) if reg_f == 0 => {
            let cfg = std::slice::from_raw_parts(m.addr as *const u8, 64);
            ldtilecfg(s, cfg)?;
        }
        // TILERELEASE (VEX.128.NP.0F38.W0 49 C0).
        (0x49, 0, None) if modrm == 0xc0 => *s = release(),
        // TILEZERO tmm (VEX.128.F2.0F38.W0 49 11:rrr:000).
        (0x49, 3, None) if rm == 0 => {
            let t = tile(reg_f)?;
            configured(s, "TILEZERO")?;
            s.data[t] = [0; 1024];
        }
        // TILELOADD / TILELOADDT1 tmm, sibmem (VEX.128.F2 / 66.0F38.W0 4B !(11):rrr:100).
        (0x4b, 3 | 1, Some(m)) => {
            let t = tile(reg_f)?;
            configured(s, "TILELOADD")?;
            if !m.sib {
                return Err("TILELOADD without a SIB byte (#UD)".into());
            }
            let (rows, colsb) = (usize::from(s.rows[t]), usize::from(s.colsb[t]));
            let mut d = [0u8; 1024];
            for r in 0..rows {
                let src = (m.addr.wrapping_add(m.stride.wrapping_mul(r as u64))) as *const u8;
                std::ptr::copy_nonoverlapping(src, d[r * 64..].as_mut_ptr(), colsb);
            }
            s.data[t] = d;
        }
        // TILESTORED sibmem, tmm (VEX.128.F3.0F38.W0 4B !(11):rrr:100).
        (0x4b, 2, Some(m)) => {
            let t = tile(reg_f)?;
            configured(s, "TILESTORED")?;
            if !m.sib {
                return Err("TILESTORED without a SIB byte (#UD)".into());
            }
            let (rows, colsb) = (usize::from(s.rows[t]), usize::from(s.colsb[t]));
            for r in 0..rows {
                let dst = (m.addr.wrapping_add(m.stride.wrapping_mul(r as u64))) as *mut u8;
                std::ptr::copy_nonoverlapping(s.data[t][r * 64..].as_ptr(), dst, colsb);
            }
        }
        // TDPBF16PS tmm1, tmm2, tmm3 (VEX.128.F3.0F38.W0 5C 11:rrr:bbb).
        (0x5c, 2, None) => tdpbf16ps(s, tile(reg_f)?, tile(rm)?, tile(vvvv)?)?,
        _ => {
            return Err(format!(
                "not a tile instruction the stand-in knows (opcode {op:#04x}, pp {pp}, ModRM {modrm:#04x})"
            ))
        }
    }
    Ok(len)
}

fn release() -> State {
    State {
        configured: false,
        rows: [0; 8],
        colsb: [0; 8],
        data: [[0; 1024]; 8],
    }
}

fn configured(s: &State, what: &str) -> Result<(), String> {
    if s.configured {
        Ok(())
    } else {
        Err(format!("{what} before LDTILECFG (#UD)"))
    }
}

/// LDTILECFG: palette 0 releases; palette 1 sets each tile's rows and bytes per row
/// (at most 16 and 64, both zero or neither), the reserved bytes and tiles 8–15 zero
/// (else #GP); every tile is zeroed.
fn ldtilecfg(s: &mut State, cfg: &[u8]) -> Result<(), String> {
    match cfg[0] {
        0 => {
            *s = release();
            return Ok(());
        }
        1 => {}
        p => return Err(format!("LDTILECFG: palette {p} (#GP)")),
    }
    if cfg[1] != 0 {
        return Err("LDTILECFG: start_row not 0".into());
    }
    if cfg[2..16].iter().any(|&b| b != 0) {
        return Err("LDTILECFG: reserved bytes not zero (#GP)".into());
    }
    let mut next = release();
    for t in 0..16 {
        let colsb = u16::from_le_bytes([cfg[16 + 2 * t], cfg[17 + 2 * t]]);
        let rows = cfg[48 + t];
        if t >= 8 {
            if colsb != 0 || rows != 0 {
                return Err(format!("LDTILECFG: tile {t} past palette 1's eight (#GP)"));
            }
            continue;
        }
        if colsb > 64 || rows > 16 || (colsb == 0) != (rows == 0) {
            return Err(format!(
                "LDTILECFG: tile {t}: {rows} rows of {colsb} bytes (#GP)"
            ));
        }
        next.rows[t] = rows;
        next.colsb[t] = colsb;
    }
    next.configured = true;
    *s = next;
    Ok(())
}

/// A bf16 as f32, denormals as zero (TDPBF16PS's DAZ).
fn widen(h: u16) -> f32 {
    if h & 0x7f80 == 0 {
        f32::from_bits(u32::from(h & 0x8000) << 16)
    } else {
        f32::from_bits(u32::from(h) << 16)
    }
}

/// TDPBF16PS: for each row `m` of the destination and pair `k` of `a`'s row,
/// `dst[m][n] += a[m][2k]·b[k][2n] + a[m][2k+1]·b[k][2n+1]` in f32 (denormal inputs as
/// zero, denormal results flushed); the bytes past the destination's columns zeroed.
fn tdpbf16ps(s: &mut State, d: usize, a: usize, b: usize) -> Result<(), String> {
    configured(s, "TDPBF16PS")?;
    let (drows, dcolsb) = (usize::from(s.rows[d]), usize::from(s.colsb[d]));
    let (arows, acolsb) = (usize::from(s.rows[a]), usize::from(s.colsb[a]));
    let (brows, bcolsb) = (usize::from(s.rows[b]), usize::from(s.colsb[b]));
    if d == a || d == b || a == b {
        return Err(format!(
            "TDPBF16PS tmm{d}, tmm{a}, tmm{b}: tiles not distinct (#UD)"
        ));
    }
    if acolsb / 4 != brows
        || dcolsb != bcolsb
        || drows != arows
        || dcolsb % 4 != 0
        || acolsb % 4 != 0
    {
        return Err(format!(
            "TDPBF16PS: shapes {drows}x{dcolsb} += {arows}x{acolsb} · {brows}x{bcolsb} (bytes) do not match (#UD)"
        ));
    }
    let word = |t: &[u8; 1024], at: usize| u16::from_le_bytes([t[at], t[at + 1]]);
    let (ta, tb) = (s.data[a], s.data[b]);
    let dst = &mut s.data[d];
    for m in 0..drows {
        for n in 0..dcolsb / 4 {
            let at = m * 64 + 4 * n;
            let mut acc = f32::from_le_bytes([dst[at], dst[at + 1], dst[at + 2], dst[at + 3]]);
            for k in 0..acolsb / 4 {
                let (a0, a1) = (word(&ta, m * 64 + 4 * k), word(&ta, m * 64 + 4 * k + 2));
                let (b0, b1) = (word(&tb, k * 64 + 4 * n), word(&tb, k * 64 + 4 * n + 2));
                acc += widen(a0) * widen(b0);
                acc += widen(a1) * widen(b1);
            }
            if acc.is_subnormal() {
                acc = f32::from_bits(acc.to_bits() & 0x8000_0000);
            }
            dst[at..at + 4].copy_from_slice(&acc.to_le_bytes());
        }
        dst[m * 64 + dcolsb..(m + 1) * 64].fill(0);
    }
    dst[drows * 64..].fill(0);
    Ok(())
}
