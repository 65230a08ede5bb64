//! bf16 products on Intel AMX (`tdpbf16ps`; Sapphire Rapids and later): the operands of
//! the AVX512-BF16 kernels in [`bf16`](super::bf16), multiplied in the CPU's tile
//! registers instead of its vector registers.
//!
//! **Tiles.** AMX has eight tile registers of up to 16 rows × 64 bytes. Every tile here
//! is configured full: a tile of `C` is 16 rows × 16 f32, of `A` 16 rows × 16 pairs of
//! bf16 (32 values of `k`), of `B` 16 pairs of rows × 16 columns, each `u32` a pair (the
//! even `k` in the low half: the layout of [`bf16::pack_b`](super::bf16::pack_b) and of
//! [`bf16::interleave`](super::bf16::interleave), the "VNNI" layout `tdpbf16ps` reads).
//! One `tdpbf16ps` adds 16 × 16 dot products of 32 terms. A block of `C` of 32 × 32 sums
//! lives in `tmm0`–`tmm3`, two tiles of `A` in `tmm4`–`tmm5` and two of `B` in
//! `tmm6`–`tmm7`, so each tile loaded serves two products.
//!
//! **Edges.** A tile always reads 16 whole rows of 64 bytes, so the parts of an operand
//! that are not whole tiles are first copied into small zeroed buffers: the rows of `A`
//! past the last whole block of 32, the last `k2 mod 16` pairs of `A` and `B`, and `C`
//! (through a 32 × 32 buffer, so that columns and rows past the product are never
//! written). The implicit convolution ([`taps`]) copies each block of 32 output pixels'
//! taps into one such buffer (its patches, in the cache), since a tile's rows must be
//! one stride apart.
//!
//! **Order and bits.** The sums of one block run in an order fixed by the shapes and the
//! CPU, so the same inputs give the same bits whatever the thread count, as on the other
//! paths; the order differs from the AVX512-BF16 kernel's, so a run keeps the path it
//! learnt on.
//!
//! **Detection** ([`available`]): CPUID leaf 7 (EDX bit 22, AMX-BF16, and bit 24,
//! AMX-TILE), the OS's XCR0 (bits 17 and 18, the tile state) and Linux's permission for
//! the tile data, asked once per process with `arch_prctl(ARCH_REQ_XCOMP_PERM,
//! XFEATURE_XTILEDATA)`. A refused request is said once and the products stay on
//! AVX512-BF16. `CIFAR_DF_NO_AMX=1` ([`HIDE_ENV`]) hides AMX.
//!
//! **Tests.** The tile instructions are written with `asm!` (their intrinsics are not
//! stable). Where the CPU lacks AMX, the tests run the same machine code on a test-only
//! stand-in for the tile unit (`emulate`): a `SIGILL` handler that decodes each tile
//! instruction and carries it out as Intel's Software Developer's Manual specifies, on
//! per-thread tile registers. Where the CPU has AMX, the same tests run on it.

use std::cell::RefCell;
use std::sync::OnceLock;

#[cfg(test)]
pub(crate) mod emulate;

/// The environment variable that hides AMX (`CIFAR_DF_NO_AMX=1`): bf16 products then run
/// on AVX512-BF16, as on a CPU without AMX.
pub const HIDE_ENV: &str = "CIFAR_DF_NO_AMX";

/// Rows of a block of `C`: two tiles.
const MB: usize = 32;
/// Columns of a block of `C`: two tiles (`bf16::NR`).
const NB: usize = 32;
/// Pairs of `k` per tile of `A` (its 64 bytes a row).
const KT: usize = 16;
/// Bytes of a tile's row.
const ROW: usize = 64;

/// Whether the products can run on AMX here: the CPU has it, Linux lends the tile
/// state, and [`HIDE_ENV`] does not hide it. Asked once. (The bf16 path also needs
/// AVX512-BF16 for its conversions, which every AMX CPU has: `Kernel::available` asks
/// both.)
pub fn available() -> bool {
    support().is_ok()
}

/// `Ok` where [`available`], else why not (said once as a warning where the CPU has AMX
/// but cannot use it).
pub fn support() -> &'static Result<(), String> {
    static S: OnceLock<Result<(), String>> = OnceLock::new();
    S.get_or_init(|| {
        if std::env::var_os(HIDE_ENV).is_some_and(|v| !v.is_empty() && v != "0") {
            return Err(format!("{HIDE_ENV} hides AMX"));
        }
        if !cpu_has_amx() {
            return Err("this CPU has no AMX-BF16 (amx_bf16 in lscpu's flags)".into());
        }
        request_tiles().map_err(|errno| {
            let why = format!(
                "this CPU has AMX, but Linux refused this process its tile state \
                 (arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA): errno {errno}): the bf16 \
                 products run on AVX512-BF16"
            );
            tracing::warn!("{why}");
            why
        })
    })
}

/// CPUID's AMX-TILE and AMX-BF16, and the tile state enabled by the OS in XCR0.
fn cpu_has_amx() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__cpuid, __cpuid_count};
        #[allow(unused_unsafe)]
        // SAFETY: CPUID leaves 0, 1 and 7 exist on every x86-64 CPU that reports them
        // (leaf 0's maximum is checked first).
        let (max, l1, l7) = unsafe {
            let max = __cpuid(0).eax;
            (max, __cpuid(1), __cpuid_count(7, 0))
        };
        if max < 7 {
            return false;
        }
        let amx = (l7.edx >> 22) & 1 == 1 && (l7.edx >> 24) & 1 == 1;
        let osxsave = (l1.ecx >> 27) & 1 == 1;
        if !(amx && osxsave) {
            return false;
        }
        let (lo, _hi): (u32, u32);
        // SAFETY: XGETBV with ECX = 0 is valid where CPUID reports OSXSAVE (checked).
        unsafe {
            std::arch::asm!("xgetbv", in("ecx") 0u32, out("eax") lo, out("edx") _hi,
                options(nomem, nostack, preserves_flags))
        };
        // XTILECFG (17) and XTILEDATA (18).
        (lo >> 17) & 3 == 3
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Asks Linux for this process's tile data state: `Err(errno)` where refused.
fn request_tiles() -> Result<(), i64> {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        const SYS_ARCH_PRCTL: i64 = 158;
        const ARCH_REQ_XCOMP_PERM: u64 = 0x1023;
        const XFEATURE_XTILEDATA: u64 = 18;
        let ret: i64;
        // SAFETY: the arch_prctl system call with two integer arguments; it reads and
        // writes no memory of ours. `syscall` clobbers rcx and r11.
        unsafe {
            std::arch::asm!("syscall",
                inlateout("rax") SYS_ARCH_PRCTL => ret,
                in("rdi") ARCH_REQ_XCOMP_PERM,
                in("rsi") XFEATURE_XTILEDATA,
                lateout("rcx") _, lateout("r11") _,
                options(nostack))
        };
        if ret < 0 {
            Err(-ret)
        } else {
            Ok(())
        }
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    {
        Err(38) // ENOSYS
    }
}

/// Whether the products may run on tiles now: on the CPU ([`available`]), or on the
/// tests' stand-in.
fn usable() -> bool {
    #[cfg(test)]
    if emulate::installed() {
        return true;
    }
    available()
}

/// Where the blocks of 32 columns of `B` are: block `jb`'s pair row `p` starts at
/// `jb·per_block + p·stride` (`u32`s) and holds 32 pairs.
#[derive(Clone, Copy, Debug)]
pub(super) struct BBlocks {
    pub per_block: usize,
    pub stride: usize,
}

/// Buffers of one thread: `A`'s rows and tails, `B`'s tails.
#[derive(Default)]
struct Stage {
    a: Vec<u32>,
    a_tail: Vec<u32>,
    b_tail: Vec<u32>,
}

thread_local! {
    static STAGE: RefCell<Stage> = RefCell::new(Stage::default());
    /// [`taps`]' patches of a block of 32 rows.
    static PATCHES: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
}

fn zeroed(v: &mut Vec<u32>, len: usize) -> &mut [u32] {
    v.clear();
    v.resize(len, 0);
    &mut v[..]
}

/// `c (m × n, row stride ldc) = A·B`, or `+= A·B` when `accumulate`: `A` `m` rows of
/// `k2` pairs at stride `lda`, `B` `k2` rows of pairs in blocks of 32 columns
/// ([`BBlocks`]), each block whole in `b` (the columns past `n` read, not stored).
///
/// # Panics
/// Where the tiles are not usable, or the operands are short: callers size them from
/// the shapes, never from input.
#[allow(clippy::too_many_arguments)]
pub(super) fn product(
    m: usize,
    n: usize,
    k2: usize,
    a: &[u32],
    lda: usize,
    b: &[u32],
    blocks: BBlocks,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    assert!(usable(), "an AMX product on a CPU without AMX");
    if m == 0 || n == 0 {
        return;
    }
    assert!(lda >= k2 && a.len() >= (m - 1) * lda + k2, "amx product: a");
    assert!(c.len() >= (m - 1) * ldc + n, "amx product: c");
    let nb = n.div_ceil(NB);
    assert!(
        k2 == 0 || b.len() >= (nb - 1) * blocks.per_block + (k2 - 1) * blocks.stride + NB,
        "amx product: b"
    );
    let (full, tail) = (k2 / KT, k2 % KT);
    STAGE.with(|st| {
        let st = &mut *st.borrow_mut();
        let b_tail = stage_b_tails(&mut st.b_tail, b, blocks, nb, full, tail);
        let mut tiles = Tiles::new();
        for i0 in (0..m).step_by(MB) {
            let rows = MB.min(m - i0);
            // Whole tiles of A in place where the block has 32 rows, else copied.
            let (ap, ldap): (&[u32], usize) = if rows == MB || full == 0 {
                (&a[i0 * lda..], lda)
            } else {
                let s = zeroed(&mut st.a, MB * full * KT);
                for r in 0..rows {
                    let src = &a[(i0 + r) * lda..][..full * KT];
                    s[r * full * KT..(r + 1) * full * KT].copy_from_slice(src);
                }
                (&st.a[..], full * KT)
            };
            let a_tail = zeroed(&mut st.a_tail, if tail > 0 { MB * KT } else { 0 });
            for r in 0..rows.min(if tail > 0 { MB } else { 0 }) {
                let src = &a[(i0 + r) * lda + full * KT..][..tail];
                a_tail[r * KT..r * KT + tail].copy_from_slice(src);
            }
            for jb in 0..nb {
                let cols = NB.min(n - jb * NB);
                let cb = &mut c[i0 * ldc + jb * NB..];
                tiles.begin(cb, ldc, rows, cols, accumulate);
                if full > 0 {
                    let bp = &b[jb * blocks.per_block..];
                    // SAFETY: `ap` holds `rows` (in place: 32) rows of at least
                    // `full·16` pairs at stride `ldap` (a copy: 32 rows), `bp`
                    // `full·16` pair rows of 32 pairs at stride `blocks.stride`
                    // (checked against `b.len()` above); the tiles are usable.
                    unsafe {
                        tiles.chunks(
                            ap.as_ptr(),
                            ldap,
                            bp.as_ptr(),
                            blocks.stride,
                            full,
                            ap.len(),
                            bp.len(),
                        )
                    };
                }
                if tail > 0 {
                    let bt = &b_tail[jb * KT * NB..(jb + 1) * KT * NB];
                    // SAFETY: both tails are whole tiles (32 × 16 and 16 × 32 pairs).
                    unsafe {
                        tiles.chunks(st.a_tail.as_ptr(), KT, bt.as_ptr(), NB, 1, MB * KT, KT * NB)
                    };
                }
                tiles.end(cb, ldc, rows, cols);
            }
        }
    });
}

/// The last `tail` pair rows of each block of `B`, zero-padded to 16 rows of 32 pairs.
fn stage_b_tails<'s>(
    buf: &'s mut Vec<u32>,
    b: &[u32],
    blocks: BBlocks,
    nb: usize,
    full: usize,
    tail: usize,
) -> &'s [u32] {
    let out = zeroed(buf, if tail > 0 { nb * KT * NB } else { 0 });
    for jb in 0..nb.min(if tail > 0 { nb } else { 0 }) {
        for p in 0..tail {
            let src = &b[jb * blocks.per_block + (full * KT + p) * blocks.stride..][..NB];
            out[(jb * KT + p) * NB..(jb * KT + p + 1) * NB].copy_from_slice(src);
        }
    }
    out
}

/// The implicit convolution of [`bf16::gemm_taps`](super::bf16::gemm_taps) on tiles:
/// `c` (`rows × n`, stride `ldc`) `= Σ_t Σ_q x[off(r, t) + q] · B[t·ci2 + q]`, the
/// offsets in tiles of `mr` rows tap by tap (`off(r, t) = offs[((r / mr)·taps + t)·mr +
/// r % mr]`, `x.len()` the padding), `B` packed ([`bf16::pack_b`](super::bf16::pack_b)).
/// Each block of 32 rows' taps is copied into a patch buffer first (callers have
/// checked every offset against `x`).
#[allow(clippy::too_many_arguments)]
pub(super) fn taps(
    rows: usize,
    n: usize,
    ci2: usize,
    taps: usize,
    mr: usize,
    x: &[u32],
    offs: &[usize],
    b: &[u32],
    c: &mut [f32],
    ldc: usize,
) {
    let k2 = taps * ci2;
    let lda = k2.div_ceil(KT) * KT;
    let padding = x.len();
    PATCHES.with(|block| {
        let block = &mut *block.borrow_mut();
        for i0 in (0..rows).step_by(MB) {
            let r = MB.min(rows - i0);
            // The block's patches: 32 rows of `k2` pairs (rows past the product zero).
            let a = zeroed(block, MB * lda);
            for i in 0..r {
                let row = i0 + i;
                let (tile, at) = (row / mr, row % mr);
                for t in 0..taps {
                    let o = offs[(tile * taps + t) * mr + at];
                    if o != padding {
                        a[i * lda + t * ci2..][..ci2].copy_from_slice(&x[o..o + ci2]);
                    }
                }
            }
            product(
                r,
                n,
                k2,
                &block[..(r - 1) * lda + k2],
                lda,
                b,
                BBlocks {
                    per_block: k2 * NB,
                    stride: NB,
                },
                &mut c[i0 * ldc..],
                ldc,
                false,
            );
        }
    });
}

/// A block of `C` in `tmm0`–`tmm3` through a 32 × 32 buffer; the tile configuration
/// ([`CONFIG`]) is loaded when made and released when dropped (once per product).
struct Tiles {
    c: Box<[f32; MB * NB]>,
}

/// The configuration every tile uses: 16 rows of 64 bytes.
#[repr(C, align(64))]
struct Config {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

const CONFIG: Config = Config {
    palette: 1,
    start_row: 0,
    reserved: [0; 14],
    colsb: [
        ROW as u16, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0,
    ],
    rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
};

/// `tileloadd tmmT, [p + stride]`.
macro_rules! load {
    ($t:literal, $p:expr, $stride:expr) => {
        std::arch::asm!(
            concat!("tileloadd tmm", $t, ", [{p} + {s}*1]"),
            p = in(reg) $p,
            s = in(reg) $stride,
            options(nostack, readonly, preserves_flags)
        )
    };
}

/// `tilestored [p + stride], tmmT`.
macro_rules! store {
    ($t:literal, $p:expr, $stride:expr) => {
        std::arch::asm!(
            concat!("tilestored [{p} + {s}*1], tmm", $t),
            p = in(reg) $p,
            s = in(reg) $stride,
            options(nostack, preserves_flags)
        )
    };
}

/// `tdpbf16ps tmmC, tmmA, tmmB`: `C += A·B`.
macro_rules! dot {
    ($c:literal, $a:literal, $b:literal) => {
        std::arch::asm!(
            concat!("tdpbf16ps tmm", $c, ", tmm", $a, ", tmm", $b),
            options(nostack, nomem, preserves_flags)
        )
    };
}

impl Tiles {
    fn new() -> Tiles {
        // SAFETY: callers checked that the tiles are usable; the configuration is 64
        // aligned bytes as LDTILECFG reads them.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            std::arch::asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly, preserves_flags))
        };
        Tiles {
            c: Box::new([0.0; MB * NB]),
        }
    }

    /// Loads `C`'s block (`rows × cols` of `c` at stride `ldc`, zeros past them; all
    /// zeros unless `accumulate`) into `tmm0`–`tmm3`.
    fn begin(&mut self, c: &[f32], ldc: usize, rows: usize, cols: usize, accumulate: bool) {
        self.c.fill(0.0);
        if accumulate {
            for r in 0..rows {
                self.c[r * NB..r * NB + cols].copy_from_slice(&c[r * ldc..r * ldc + cols]);
            }
        }
        let p = self.c.as_ptr() as *const u8;
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the buffer holds 32 rows of 128 bytes: four tiles of 16 rows × 64
        // bytes at a stride of 128.
        unsafe {
            load!(0, p, 4 * NB);
            load!(1, p.add(ROW), 4 * NB);
            load!(2, p.add(16 * 4 * NB), 4 * NB);
            load!(3, p.add(16 * 4 * NB + ROW), 4 * NB);
        }
    }

    /// `tmm0`–`tmm3 += A·B` over `chunks` tiles of `k`: `A` 32 rows at stride `lda`
    /// pairs, chunk `q` at pair `16q`; `B` pair rows at stride `ldb` pairs, chunk `q` at
    /// row `16q`.
    ///
    /// # Safety
    /// The tiles usable; `a` valid for `a_len` pairs and `b` for `b_len`, which hold
    /// every row the chunks read (asserted).
    #[allow(clippy::too_many_arguments)]
    unsafe fn chunks(
        &mut self,
        a: *const u32,
        lda: usize,
        b: *const u32,
        ldb: usize,
        chunks: usize,
        a_len: usize,
        b_len: usize,
    ) {
        assert!(
            chunks == 0
                || (31 * lda + chunks * KT <= a_len && (chunks * KT - 1) * ldb + NB <= b_len)
        );
        let (sa, sb) = (4 * lda, 4 * ldb);
        for q in 0..chunks {
            let ap = a.add(q * KT) as *const u8;
            let bp = b.add(q * KT * ldb) as *const u8;
            #[cfg(target_arch = "x86_64")]
            {
                load!(4, ap, sa);
                load!(5, ap.add(16 * sa), sa);
                load!(6, bp, sb);
                load!(7, bp.add(ROW), sb);
                dot!(0, 4, 6);
                dot!(1, 4, 7);
                dot!(2, 5, 6);
                dot!(3, 5, 7);
            }
        }
    }

    /// Stores `tmm0`–`tmm3` and writes the block's `rows × cols` into `c`.
    fn end(&mut self, c: &mut [f32], ldc: usize, rows: usize, cols: usize) {
        let p = self.c.as_mut_ptr() as *mut u8;
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `begin`.
        unsafe {
            store!(0, p, 4 * NB);
            store!(1, p.add(ROW), 4 * NB);
            store!(2, p.add(16 * 4 * NB), 4 * NB);
            store!(3, p.add(16 * 4 * NB + ROW), 4 * NB);
        }
        for r in 0..rows {
            c[r * ldc..r * ldc + cols].copy_from_slice(&self.c[r * NB..r * NB + cols]);
        }
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: TILERELEASE after LDTILECFG returns the tile state to its initial one.
        unsafe {
            std::arch::asm!("tilerelease", options(nostack, nomem, preserves_flags))
        };
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::super::bf16::{self, pairs, round_bf16, Unit, NR};
    use super::*;

    /// Readies the tiles for a test: on the CPU where it has AMX, else on the stand-in
    /// ([`emulate`]); `false` (said once) where the test cannot run: the stand-in needs
    /// x86-64 Linux, and the tests build their operands with AVX512-BF16.
    pub(crate) fn ready(test: &str) -> bool {
        if !cfg!(all(target_arch = "x86_64", target_os = "linux")) || !bf16::available() {
            eprintln!("{test}: not run: AMX's tests need x86-64 Linux with AVX512-BF16");
            return false;
        }
        emulate::install();
        if !emulate::native() {
            eprintln!(
                "{test}: on the stand-in for AMX ({})",
                support().as_ref().err().map_or("", String::as_str)
            );
        }
        true
    }

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::rng::SplitMix(seed);
        (0..n).map(|_| rng.normal() as f32).collect()
    }

    /// The tile products against f64 products of the same bf16-rounded inputs, equal up
    /// to the f32 sums, and against the AVX512-BF16 kernel's (the same up to the order
    /// of the sums), with `B` packed and as rows of pairs, overwriting and accumulating:
    /// rows past a block of 32, columns past a block of 32, `k` past whole tiles of 32,
    /// an odd `k`, one row, one column; the memory past each product untouched.
    #[test]
    fn tile_products_match_an_f64_product_of_the_rounded_inputs() {
        if !ready("tile_products_match_an_f64_product_of_the_rounded_inputs") {
            return;
        }
        let before = emulate::EMULATED.load(std::sync::atomic::Ordering::Relaxed);
        for (m, k, n) in [
            (32, 32, 32),
            (1, 1, 1),
            (13, 7, 33),
            (45, 431, 70),
            (64, 96, 64),
            (70, 2 * 192 + 5, 16),
            (7, 64, 5),
            (33, 30, 96),
        ] {
            let a = values(m * k, 1 + m as u64);
            let b = values(k * n, 2 + n as u64);
            let lda = pairs(k) + 2;
            let mut pa = vec![0u32; m * lda];
            for i in 0..m {
                let row: &mut [u16] = bytemuck::cast_slice_mut(&mut pa[i * lda..(i + 1) * lda]);
                bf16::convert(&a[i * k..(i + 1) * k], &mut row[..k]);
                // The padding of a row not zero: never read.
                if k % 2 == 0 {
                    for v in &mut pa[i * lda + pairs(k)..(i + 1) * lda] {
                        *v = 0x7fc0_7fc0;
                    }
                }
            }
            let mut pb = vec![0u32; bf16::b_len(k, n)];
            bf16::pack_b(&b, k, n, n, &mut pb);
            let mut b16 = vec![0u16; k * n];
            bf16::convert(&b, &mut b16);
            // B as rows of pairs, the columns past n NaN (read, never stored).
            let ldb = n.div_ceil(NR) * NR + NR;
            let mut rb = vec![0x7fc0_7fc0u32; pairs(k) * ldb];
            for p in 0..pairs(k) {
                let lo = &b16[2 * p * n..(2 * p + 1) * n];
                let hi = (2 * p + 1 < k).then(|| &b16[(2 * p + 1) * n..(2 * p + 2) * n]);
                bf16::interleave(lo, hi, &mut rb[p * ldb..p * ldb + n]);
            }
            let ldc = n + 3;
            let run = |unit: Unit, rows: bool, acc: Option<&[f32]>| {
                let mut c = acc.map_or_else(|| vec![f32::NAN; m * ldc], <[f32]>::to_vec);
                if rows {
                    bf16::gemm_pair_rows(
                        unit,
                        m,
                        n,
                        k,
                        &pa,
                        lda,
                        &rb,
                        ldb,
                        &mut c,
                        ldc,
                        acc.is_some(),
                    );
                } else {
                    bf16::gemm(unit, m, n, k, &pa, lda, &pb, &mut c, ldc, acc.is_some());
                }
                c
            };
            let c = run(Unit::Amx, false, None);
            let vector = run(Unit::Avx512, false, None);
            let mut tols = vec![0.0f64; m * n];
            for i in 0..m {
                for j in 0..n {
                    let (mut want, mut mag) = (0.0f64, 0.0f64);
                    for t in 0..k {
                        let p = f64::from(round_bf16(a[i * k + t]))
                            * f64::from(round_bf16(b[t * n + j]));
                        want += p;
                        mag += p.abs();
                    }
                    let tol = mag * k as f64 * 6e-8 + 1e-30;
                    tols[i * n + j] = tol;
                    for (what, got) in [("amx", c[i * ldc + j]), ("avx512", vector[i * ldc + j])] {
                        let got = f64::from(got);
                        assert!(
                            (got - want).abs() <= tol,
                            "{m}x{k}x{n} {what} [{i},{j}]: {got} vs {want}"
                        );
                    }
                }
                if i + 1 < m {
                    assert!(
                        c[i * ldc + n..(i + 1) * ldc].iter().all(|v| v.is_nan()),
                        "{m}x{k}x{n}: wrote past column n"
                    );
                }
            }
            // B as rows of pairs: the same sums in the same order, the same bits.
            let c2 = run(Unit::Amx, true, None);
            assert!(c.iter().zip(&c2).all(|(x, y)| x.to_bits() == y.to_bits()));
            // Accumulating adds the same product again (its sums rounded anew: within
            // twice the product's tolerance).
            let twice = run(Unit::Amx, false, Some(&c));
            let twice_rows = run(Unit::Amx, true, Some(&c));
            for i in 0..m {
                for j in 0..n {
                    let (x, y) = (twice[i * ldc + j], 2.0 * c[i * ldc + j]);
                    let tol = 2.0 * tols[i * n + j];
                    assert!(
                        (f64::from(x) - f64::from(y)).abs() <= tol,
                        "{m}x{k}x{n} acc [{i},{j}]: {x} vs {y}"
                    );
                    assert_eq!(x.to_bits(), twice_rows[i * ldc + j].to_bits());
                }
            }
        }
        let used = emulate::EMULATED.load(std::sync::atomic::Ordering::Relaxed) - before;
        assert!(
            emulate::native() || used > 0,
            "the stand-in carried out no tile instruction"
        );
    }

    /// The implicit convolution on tiles against the f64 sums of its rounded inputs:
    /// taps in the padding, rows past a block of 32 and past the offsets' last tile of
    /// 12, channel pairs that are not whole tiles (12 pairs) and that are (16).
    #[test]
    fn tile_taps_match_the_f64_sums() {
        if !ready("tile_taps_match_the_f64_sums") {
            return;
        }
        let mr = bf16::MR;
        for (rows, ci2, taps, n) in [
            (45usize, 12usize, 9usize, 40usize),
            (32, 16, 4, 32),
            (7, 3, 5, 70),
            (64, 20, 9, 64),
        ] {
            let pixels = 50;
            let xf = values(pixels * 2 * ci2, 5 + rows as u64);
            let mut xh = vec![0u16; xf.len()];
            bf16::convert(&xf, &mut xh);
            let x: Vec<u32> = bytemuck::cast_slice(&xh).to_vec();
            let padding = x.len();
            let tiles = rows.div_ceil(mr);
            let mut rng = crate::rng::SplitMix(9);
            let offs: Vec<usize> = (0..tiles * taps * mr)
                .map(|_| {
                    let p = (rng.next_u64() % (pixels as u64 + 8)) as usize;
                    if p >= pixels {
                        padding
                    } else {
                        p * ci2
                    }
                })
                .collect();
            let k = 2 * taps * ci2;
            let wf = values(k * n, 6);
            let mut wb = vec![0u32; bf16::b_len(k, n)];
            bf16::pack_b(&wf, k, n, n, &mut wb);
            let ldc = n + 1;
            let mut c = vec![f32::NAN; rows * ldc];
            bf16::gemm_taps(Unit::Amx, rows, n, ci2, taps, &x, &offs, &wb, &mut c, ldc);
            let mut v = vec![f32::NAN; rows * ldc];
            bf16::gemm_taps(
                Unit::Avx512,
                rows,
                n,
                ci2,
                taps,
                &x,
                &offs,
                &wb,
                &mut v,
                ldc,
            );
            for r in 0..rows {
                for j in 0..n {
                    let (mut want, mut mag) = (0.0f64, 0.0f64);
                    for t in 0..taps {
                        let o = offs[((r / mr) * taps + t) * mr + r % mr];
                        if o == padding {
                            continue;
                        }
                        for q in 0..2 * ci2 {
                            let p = f64::from(round_bf16(xf[2 * o + q]))
                                * f64::from(round_bf16(wf[(t * 2 * ci2 + q) * n + j]));
                            want += p;
                            mag += p.abs();
                        }
                    }
                    let tol = mag * k as f64 * 6e-8 + 1e-30;
                    for (what, got) in [("amx", c[r * ldc + j]), ("avx512", v[r * ldc + j])] {
                        let got = f64::from(got);
                        assert!(
                            (got - want).abs() <= tol,
                            "{rows} rows, {ci2} pairs, {taps} taps, {n}: {what} [{r},{j}]: {got} vs {want}"
                        );
                    }
                }
                if r + 1 < rows {
                    assert!(c[r * ldc + n].is_nan(), "wrote past column n");
                }
            }
        }
    }
}
