/* Test driver: the tokenizer.bin bytes that run.c builds in memory from a
   GGUF file's metadata, so that tests/test_gguf_run.py can hold them to
   export.py's write_tokenizer_gguf(), byte for byte.

   argv:   a GGUF file
   stdout: the LTOK bytes; or exit 1 with run.c's message on stderr */

#define TESTING
#include "../run.c"

int main(int argc, char **argv) {
    if (argc != 2) return 2;
    struct stat st;
    int fd = open_input(argv[1], INT64_MAX, "a GGUF file", &st);
    unsigned char *data = xcalloc((size_t)st.st_size + 1, 1, "the file");
    if (read(fd, data, (size_t)st.st_size) != st.st_size) die(argv[1], "short read");
    close(fd);
    char err[ERROR_SIZE];
    Gguf g = {.data = data, .size = (size_t)st.st_size, .err = err};
    uint64_t n_tensors;
    size_t alignment;
    ByteBuffer ltok = {0};
    if (gguf_read_metadata(&g, &n_tensors, &alignment) || gguf_tokenizer_bytes(&g, -1, &ltok)) die(argv[1], "%s", err);
    fwrite(ltok.bytes, 1, ltok.n, stdout);
    free(ltok.bytes);
    free(g.keys);
    free(data);
    return 0;
}
