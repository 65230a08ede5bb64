-- Training and evaluation features of a run with a feature extractor (configs/patches.toml):
-- the run's fitted extractor, bound to extract_features() when the trainer registers it,
-- applied to every raw image of the stream. The default patch extractor is flip-invariant,
-- so no flip augmentation is needed (its features equal those of the mirrored image).
-- Output: `features` as FixedSizeList<Float32, D> (D: the extractor's width).
SELECT batch,
       "row",
       label,
       extract_features(image) AS features
FROM stream
