"""Quantization: tensor statistics, range setting, affine arithmetic and integer-only requantization.

``histogram`` observes calibration tensors, ``ranges`` turns their statistics into clipping
ranges, ``arithmetic`` turns ranges and weights into scales and zero points and quantizes, and
``fixed_point`` requantizes int32 accumulators with integer-only multipliers.
"""
