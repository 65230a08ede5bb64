-- Summary of an exported stream, per class: used by `cifar-df demo`.
-- {table} is replaced by the quoted Parquet path.
SELECT label,
       count(*)                       AS images,
       count(DISTINCT batch)          AS batches,
       avg(array_element(image, 1))   AS mean_first_red_pixel
FROM {table}
GROUP BY label
ORDER BY label
