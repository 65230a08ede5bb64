-- Evaluation with flip averaging (`--flip-test`): eval.sql plus the mirrored image's
-- features in `features_flipped`; the scores are the mean of the model's probabilities
-- for the two. hflip(image, 1.0) mirrors every image.
SELECT batch,
       "row",
       label,
       image,
       normalize(image,
                 0.4914, 0.4822, 0.4465,
                 0.2470, 0.2435, 0.2616) AS features,
       normalize(hflip(image, 1.0),
                 0.4914, 0.4822, 0.4465,
                 0.2470, 0.2435, 0.2616) AS features_flipped
FROM stream
