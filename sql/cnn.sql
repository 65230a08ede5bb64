-- Training images for the CNN (`--model cnn`, configs/cnn.toml): airbench94's
-- augmentation as the original's preprocessing list,
--   RandomHorizontalFlip(p=0.5), a random translation by up to 2 pixels each way with the
--   border reflected, then
--   Normalize(mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)).
-- Each decision is a function of (seed, batch, row), so a run and its resume see the same
-- images. Output: `features` as FixedSizeList<Float32, 3072> (CIFAR order).
SELECT batch,
       "row",
       label,
       normalize(translate(hflip(image, 0.5, batch, "row"), 2, batch, "row"),
                 0.4914, 0.4822, 0.4465,
                 0.2470, 0.2435, 0.2616) AS features
FROM stream
