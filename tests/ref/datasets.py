#!/usr/bin/env python3
"""Test-only: builds image folders and CIFAR-100 files for tests/it/folders.rs, and checks
cifar-df's decoded images against Pillow's.

    datasets.py folder OUT CLASSES PER_CLASS TEST_PER_CLASS SEED [SIZES]
        OUT/train/cNN/*.png|*.jpg (and OUT/test/...): images of mixed sizes (32x32, 17x23,
        48x40, or SIZES such as 64x64,17x23: height x width) and modes (RGB, L, RGBA, P),
        each class a colour, so that they are learnable.
    datasets.py bad OUT        OUT/train/cNN/ with good images, plus a text file named .jpg,
        a truncated PNG and a 0-byte .png, which must be rejected by name.
    datasets.py cifar100 OUT PER_CLASS_TRAIN PER_CLASS_TEST SEED
        OUT/cifar-100-binary/{train,test}.bin + fine_label_names.txt and
        OUT/cifar-100-python/{train,test,meta} (pickle protocol 2, as the official files).
    datasets.py compare FOLDER PARQUET [SIDE]
        Every SIDE x SIDE (default 32x32) image file of FOLDER/train, decoded by Pillow,
        against the images of the Parquet file `cifar-df export` wrote: PNGs must be found
        exactly (same label), JPEGs within a mean absolute difference of 2 per value.
        Prints the worst JPEG difference.
"""
import os, pickle, sys
import numpy as np
from PIL import Image

SIZES = [(32, 32), (17, 23), (48, 40)]
MODES = ["RGB", "L", "RGBA", "P"]

def colour(k, classes):
    rng = np.random.default_rng(1000 + k)
    return rng.integers(0, 256, 3)

def picture(k, classes, rng, h, w):
    base = colour(k, classes)
    img = np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
    # A class-dependent stripe so grey images still differ by class.
    img[(k * 3) % h, :, :] = 255 - base
    return img

def write_folder(out, classes, per_class, test_per_class, seed, sizes=None):
    rng = np.random.default_rng(seed)
    sizes = sizes or SIZES
    for split, n in (("train", per_class), ("test", test_per_class)):
        if n == 0:
            continue
        for k in range(classes):
            d = os.path.join(out, split, f"c{k:02d}")
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                h, w = sizes[i % len(sizes)]
                mode = MODES[(i // len(sizes)) % len(MODES)]
                im = Image.fromarray(picture(k, classes, rng, h, w)).convert(mode)
                if i % 2 == 0 or mode in ("RGBA", "P"):
                    im.save(os.path.join(d, f"{i:04d}.png"))
                else:
                    im.convert("RGB" if mode != "L" else "L").save(
                        os.path.join(d, f"{i:04d}.jpg"), quality=90)

def write_bad(out):
    write_folder(out, 3, 6, 0, 7)
    d = os.path.join(out, "train", "c01")
    with open(os.path.join(d, "notes.jpg"), "w") as f:
        f.write("not an image\n")
    good = open(os.path.join(d, "0000.png"), "rb").read()
    with open(os.path.join(d, "cut.png"), "wb") as f:
        f.write(good[: len(good) // 2])
    open(os.path.join(d, "empty.png"), "wb").close()

def write_cifar100(out, per_train, per_test, seed):
    rng = np.random.default_rng(seed)
    names = [f"fine{k:02d}" for k in range(100)]
    coarse = [f"coarse{k:02d}" for k in range(20)]
    b = os.path.join(out, "cifar-100-binary"); p = os.path.join(out, "cifar-100-python")
    os.makedirs(b, exist_ok=True); os.makedirs(p, exist_ok=True)
    with open(os.path.join(b, "fine_label_names.txt"), "w") as f:
        f.write("\n".join(names) + "\n")
    with open(os.path.join(b, "coarse_label_names.txt"), "w") as f:
        f.write("\n".join(coarse) + "\n")
    for split, n in (("train", per_train), ("test", per_test)):
        labels = np.repeat(np.arange(100), n)
        rng.shuffle(labels)
        data = np.stack([picture(int(k), 100, rng, 32, 32).transpose(2, 0, 1).reshape(-1)
                         for k in labels]).astype(np.uint8)
        rec = np.concatenate([(labels // 5)[:, None].astype(np.uint8),
                              labels[:, None].astype(np.uint8), data], axis=1)
        rec.tofile(os.path.join(b, f"{split}.bin"))
        d = {"filenames": [f"{i}.png" for i in range(len(labels))], "batch_label": split,
             "fine_labels": [int(v) for v in labels], "coarse_labels": [int(v // 5) for v in labels],
             "data": data}
        with open(os.path.join(p, split), "wb") as f:
            pickle.dump(d, f, protocol=2)
    with open(os.path.join(p, "meta"), "wb") as f:
        pickle.dump({"fine_label_names": names, "coarse_label_names": coarse}, f, protocol=2)

def compare(folder, parquet, side=32):
    import pyarrow.parquet as pq
    t = pq.read_table(parquet)
    labels = t["label"].to_numpy()
    images = np.array(t["image"].combine_chunks().values.to_numpy()).reshape(
        len(labels), 3 * side * side)
    classes = sorted(os.listdir(os.path.join(folder, "train")))
    exact = {}
    for i, (l, px) in enumerate(zip(labels, images)):
        exact.setdefault((int(l), px.tobytes()), i)
    worst, n_png, n_jpg = 0.0, 0, 0
    for k, c in enumerate(classes):
        d = os.path.join(folder, "train", c)
        for name in sorted(os.listdir(d)):
            try:
                im = Image.open(os.path.join(d, name)); im.load()
            except Exception:
                continue
            if im.size != (side, side):
                continue
            px = np.asarray(im.convert("RGB")).transpose(2, 0, 1).reshape(-1)
            if name.endswith(".png"):
                assert (k, px.tobytes()) in exact, f"{c}/{name} not found exactly"
                n_png += 1
            else:
                same = images[labels == k].astype(np.int32)
                diff = np.abs(same - px.astype(np.int32)).mean(axis=1).min()
                assert diff < 2.0, f"{c}/{name}: mean abs difference {diff}"
                worst = max(worst, diff); n_jpg += 1
    assert n_png > 0 and n_jpg > 0, (n_png, n_jpg)
    print(f"png {n_png} exact, jpeg {n_jpg} worst mean abs diff {worst:.3f}")

if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "folder":
        sizes = None
        if len(sys.argv) > 7:
            sizes = [tuple(map(int, s.split("x"))) for s in sys.argv[7].split(",")]
        write_folder(sys.argv[2], *map(int, sys.argv[3:7]), sizes=sizes)
    elif cmd == "bad":
        write_bad(sys.argv[2])
    elif cmd == "cifar100":
        write_cifar100(sys.argv[2], *map(int, sys.argv[3:6]))
    elif cmd == "compare":
        compare(sys.argv[2], sys.argv[3], *map(int, sys.argv[4:5]))
