{
  "targets": [
    {
      "target_name": "shear_native",
      "sources": ["addon/shear_native.c", "addon/bitmap_kernels.c"],
      "cflags": ["-std=gnu11", "-Wall", "-Wextra", "-O3"],
      "defines": ["_FILE_OFFSET_BITS=64"]
    }
  ]
}
