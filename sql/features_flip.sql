-- Evaluation of a run with a feature extractor, with flip averaging (`--flip-test`):
-- features.sql plus the mirrored image's features in `features_flipped`; the scores are
-- the mean of the model's probabilities for the two. (A flip-invariant extractor, the
-- default patches one, gives the same features for both: no change.)
SELECT batch,
       "row",
       label,
       extract_features(image) AS features,
       extract_features(hflip(image, 1.0)) AS features_flipped
FROM stream
