-- A feature cache (`--source features:DIR`, written by `cifar-df features`): the cached
-- features as they are, flipped copies included (the `flipped` column marks them).
SELECT batch,
       "row",
       label,
       features
FROM stream
