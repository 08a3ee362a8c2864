"""fairseq_reweight: Learning to Reweight with Deep Interactions (Fan et al., AAAI 2021) for fairseq."""

from setuptools import find_packages, setup

setup(
    name="fairseq_reweight",
    version="0.1.0",
    description="Learned data reweighting (deep-interaction teacher, L2RW, MW-Net) as a fairseq plugin, "
    "with a companion noisy-label image module",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["fairseq_reweight", "fairseq_reweight.*"]),
    python_requires=">=3.8",
    install_requires=[
        # pinned: a looser spec pulls the CUDA build (several GB); GPU users may install their own torch first
        "torch==2.13.0",
        # fairseq 0.12.2 (PyPI) does not import on Python >= 3.11; fairseq-fixed is fairseq main with the
        # fixes and the same import name
        "fairseq==0.12.2; python_version < '3.11'",
        "fairseq-fixed==0.12.3.1; python_version >= '3.11'",
        "numpy",
        "sacrebleu>=2.0",
        "sentencepiece",
        "matplotlib",
        "tqdm",
    ],
    extras_require={"test": ["pytest"]},
    entry_points={"console_scripts": ["fairseq-reweight-score=fairseq_reweight.score:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
