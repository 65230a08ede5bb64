-- Training features from the live stream: the original's preprocessing list,
--   RandomHorizontalFlip(p=0.345), then
--   Normalize(mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)).
-- The flip is decided per image from (seed, batch, row), so a run is reproducible: the
-- trainer registers the functions with its run seed (cifar_df::transforms::register).
-- Output: one row per image, `features` as FixedSizeList<Float32, 3072> (CIFAR order).
SELECT batch,
       "row",
       label,
       normalize(hflip(image, 0.345, batch, "row"),
                 0.4914, 0.4822, 0.4465,
                 0.2470, 0.2435, 0.2616) AS features
FROM stream
