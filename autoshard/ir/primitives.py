"""Families of JAX primitives, by name, shared by the strategy rules and the cost model."""

from __future__ import annotations

#: One output element from the same-index elements of the operands (size-1 dims broadcast).
ELEMENTWISE = frozenset((
    "abs", "acos", "acosh", "and", "asin", "asinh", "atan", "atan2", "atanh", "cbrt", "ceil",
    "clz", "complex", "conj", "cos", "cosh", "digamma", "eq", "erf", "erf_inv", "erfc", "exp",
    "exp2", "expm1", "floor", "ge", "gt", "igamma", "imag", "integer_pow", "is_finite", "le",
    "lgamma", "log", "log1p", "logistic", "lt", "max", "min", "ne", "nextafter", "not", "or",
    "polygamma", "population_count", "pow", "real", "reduce_precision", "rem", "round", "rsqrt",
    "select_n", "shift_left", "shift_right_arithmetic", "shift_right_logical", "sign", "sin",
    "sinh", "sqrt", "square", "tan", "tanh", "xor", "clamp", "threefry2x32", "copy", "copy_p",
    "add", "sub", "add_any", "neg", "mul", "div", "convert_element_type", "bitcast_convert_type",
    "autoshard_hint", "random_fold_in", "random_split", "stop_gradient",
))
