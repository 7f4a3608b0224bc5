"""Guest images: recipes, the content-hashed cache, and the builder."""

from smolvm_kernel.images.cache import ImageCache
from smolvm_kernel.images.image import Image
from smolvm_kernel.images.recipe import PROFILES, Profile

__all__ = ["Image", "ImageCache", "PROFILES", "Profile"]
