"""File formats: NIfTI CT, pyramidal TIFF slides, PLINK genotypes, Arrow IPC, images, and the
manifest-backed datasets of fundus+genotype and image-report pairs."""
