{
  "targets": [
    {
      "target_name": "shear_native",
      "sources": ["addon/shear_native.c"],
      "cflags": ["-std=gnu11", "-Wall", "-Wextra", "-O2"],
      "defines": ["_FILE_OFFSET_BITS=64"]
    }
  ]
}
