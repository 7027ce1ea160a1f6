/* A C program that embeds images through qks.h only: one JSON line per image with its embedding (the
 * bundle's "embedding" output, L2-normalised), for similarity search or near-duplicates in C.
 *
 *     embed_image BUNDLE IMAGE...
 *
 * Exit 0 all embedded, 1 some images failed, 2 the bundle could not be opened or has no embedding
 * output (exported before embeddings: re-export it with qks-export). */
#include <stdio.h>

#include "qks/qks.h"

int main(int argc, char** argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s BUNDLE IMAGE...\n", argv[0]);
        return 2;
    }
    qks_options options;
    qks_options_init(&options);
    qks_tagger* tagger = NULL;
    if (qks_open(argv[1], &options, &tagger) != QKS_OK || qks_require_embedding(tagger) != QKS_OK) {
        fprintf(stderr, "embed_image: %s\n", qks_last_error());
        qks_close(tagger);
        return 2;
    }
    size_t n = (size_t)(argc - 2), dim = qks_embedding_dim(tagger);
    qks_results* results = NULL;
    if (qks_tag_files(tagger, (const char* const*)(argv + 2), n, &results) != QKS_OK) {
        fprintf(stderr, "embed_image: %s\n", qks_last_error());
        qks_close(tagger);
        return 2;
    }
    int failed = 0;
    for (size_t i = 0; i < n; ++i) {
        const float* e = qks_results_embedding(results, i);
        if (!e) {
            printf("%s: error: %s\n", argv[2 + i], qks_results_error(results, i));
            failed = 1;
            continue;
        }
        printf("{\"image\": \"%s\", \"embedding\": [", argv[2 + i]);
        for (size_t j = 0; j < dim; ++j) printf("%s%.9g", j ? ", " : "", e[j]);
        printf("]}\n");
    }
    qks_results_free(results);
    qks_close(tagger);
    return failed;
}
