"""The compressors by name, in one place: the segmentation methods (with the parameter each
takes) and the reducers. Imports nothing heavy, so the CLI offers them as its choices without
loading numpy or torch; ``lalmtool.compress`` holds the implementation of each name."""

#: segmentation method → the parameter it takes: ``k`` (frames per segment), ``threshold``
#: (on its peak scores; ``--target-rate`` tunes it) or None. A CTC cut comes from
#: ``lalmtool ctc segment`` (it needs an aligned CTC head, see ``lalmtool align``).
METHODS = {"peaks": None, "scpc": "threshold", "prominence": "threshold", "uniform": "k"}
THRESHOLD_METHODS = tuple(m for m, p in METHODS.items() if p == "threshold")
#: how a segment becomes one token: its mean (pooling), its first frame (downsampling) or a
#: learnt pooling (``lalmtool.pooler``: trained by ``finetune --segments``, read by
#: ``pool --pooler``)
REDUCERS = ("mean", "pick", "learnt")
