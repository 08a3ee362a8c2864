"""Noisy-label image classification with learned data reweighting (the paper's image experiments).

Fan et al. 2021 (deep-interaction teacher), with the baselines of Ren et al. 2018 (L2RW) and Shu
et al. 2019 (MW-Net), on CIFAR-10/100 and Fashion-MNIST with uniform or flip label noise. All
reweighting maths is the shared :mod:`fairseq_reweight.core`; this package adds datasets, noise,
students, the training loop and the command line (``python -m fairseq_reweight.image``).
"""
