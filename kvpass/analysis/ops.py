"""The ops the recognizers read, as Dynamo graphs (torch functions, Tensor methods) and torch.export graphs (ATen)
spell them. Sets that one recognizer alone reads live in its module."""

from __future__ import annotations

import operator

import torch

aten = torch.ops.aten

SOFTMAX_TARGETS = {torch.softmax, torch.nn.functional.softmax, aten._softmax.default, aten.softmax.int}
MATMUL_TARGETS = {torch.matmul, operator.matmul, torch.bmm, aten.matmul.default, aten.bmm.default}
CAT_TARGETS = {torch.cat, aten.cat.default}
# Ops that only re-lay-out a tensor (GQA repeat, head split, transposes, casts): followed backwards.
LAYOUT_METHODS = {"expand", "reshape", "view", "contiguous", "transpose", "to", "float", "clone",
                  "repeat_interleave", "unsqueeze", "type_as"}
LAYOUT_FUNCTIONS = {operator.getitem, torch.reshape, torch.transpose, torch.repeat_interleave,
                    torch.unsqueeze, aten.view.default, aten.expand.default, aten.reshape.default,
                    aten._unsafe_view.default, aten.clone.default, aten.unsqueeze.default,
                    aten.transpose.int, aten.slice.Tensor, aten.contiguous.default,
                    aten.repeat_interleave.self_int, aten._to_copy.default, aten.alias.default}
# Arithmetic, in place too (Falcon scales its logits with ``*=``)
MUL_TARGETS = {operator.mul, operator.imul, torch.mul, aten.mul.Tensor, aten.mul.Scalar}
DIV_TARGETS = {operator.truediv, operator.itruediv, torch.div, aten.div.Tensor, aten.div.Scalar}
ADD_TARGETS = {operator.add, operator.iadd, torch.add, aten.add.Tensor}
SUB_TARGETS = {operator.sub, operator.isub, torch.sub, aten.sub.Tensor}
