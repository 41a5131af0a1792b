"""onnx's reference evaluator, as the tests run it on ticketc's files.

onnx.reference's own GatherElements (onnx 1.23) selects through np.choose, which takes at most
64 choices: it fails on a 1-D table of more entries, which the portable decoder gathers from
(ticketc.export.decoder). This one indexes as the ONNX specification says (negative indices
count from the end), so the evaluator stays an independent second runtime for every file.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun


class GatherElements(OpRun):
    def _run(self, data, indices, axis=None):
        return (np.take_along_axis(data, indices.astype(np.int64), axis=axis or 0),)


def reference_evaluator(model: onnx.ModelProto) -> ReferenceEvaluator:
    return ReferenceEvaluator(model, new_ops=[GatherElements])
