"""Test-only reference: scikit-learn's SGDClassifier trained by partial_fit on the batches
in a .npz-free text file, printing coef_ and intercept_ as JSON.

usage: python3 sgd_reference.py DATA.txt LOSS ALPHA SCHEDULE ETA0 AVERAGE BATCH
DATA.txt: one image per line, label first, then the features, space separated.
"""
import json, sys
import numpy as np
from sklearn.linear_model import SGDClassifier

path, loss, alpha, schedule, eta0, average, batch = sys.argv[1:8]
d = np.loadtxt(path, dtype=np.float64)
y, x = d[:, 0].astype(np.int64), d[:, 1:]
clf = SGDClassifier(loss=loss, alpha=float(alpha), learning_rate=schedule, eta0=float(eta0),
                    average=int(average) if int(average) > 0 else False, shuffle=False,
                    random_state=0)
b = int(batch)
for s in range(0, len(x), b):
    clf.partial_fit(x[s:s + b], y[s:s + b], classes=np.arange(10))
print(json.dumps({"coef": clf.coef_.tolist(), "intercept": clf.intercept_.tolist()}))
