-- Evaluation features from the stream: the deterministic part of the training
-- preprocessing only (no augmentation):
--   Normalize(mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)).
-- Output: the same columns as train.sql plus the raw `image` (for the k-means cluster
-- grids), `features` as FixedSizeList<Float32, 3072>.
SELECT batch,
       "row",
       label,
       image,
       normalize(image,
                 0.4914, 0.4822, 0.4465,
                 0.2470, 0.2435, 0.2616) AS features
FROM stream
