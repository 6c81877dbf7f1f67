"""Builds fishckpt's one C extension; every other setting lives in pyproject.toml.

The extension is optional: where it cannot be compiled, fishckpt installs
without it and the exact check at save runs the pure-Python scan
(fishckpt/store/scan.py), about twice as slow and otherwise identical.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "fishckpt.store._native",
            sources=["fishckpt/store/_native.c"],
            include_dirs=["third_party/xxhash"],
            depends=["third_party/xxhash/xxhash.h"],
            optional=True,
        )
    ]
)
