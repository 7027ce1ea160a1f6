/* A C program that tags images through qks.h only: prints each image's 3 most probable labels.
 *
 *     tag_image BUNDLE IMAGE...
 *
 * Exit 0 all tagged, 1 some images failed, 2 the bundle could not be opened. */
#include <stdio.h>
#include <stdlib.h>

#include "qks/qks.h"

int main(int argc, char** argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s BUNDLE IMAGE...\n", argv[0]);
        return 2;
    }
    qks_options options;
    qks_options_init(&options);
    qks_tagger* tagger = NULL;
    if (qks_open(argv[1], &options, &tagger) != QKS_OK) {
        fprintf(stderr, "tag_image: %s\n", qks_last_error());
        return 2;
    }
    qks_results* results = NULL;
    size_t n = (size_t)(argc - 2);
    if (qks_tag_files(tagger, (const char* const*)(argv + 2), n, &results) != QKS_OK) {
        fprintf(stderr, "tag_image: %s\n", qks_last_error());
        qks_close(tagger);
        return 2;
    }
    int failed = 0;
    for (size_t i = 0; i < n; ++i) {
        const char* error = qks_results_error(results, i);
        if (error) {
            printf("%s: error: %s\n", argv[2 + i], error);
            failed = 1;
            continue;
        }
        const float* p = qks_results_probabilities(results, i);
        size_t top[3];
        size_t k = qks_results_select(results, i, 3, -1.0, top, 3);
        printf("%s:", argv[2 + i]);
        for (size_t j = 0; j < k && j < 3; ++j) printf(" %s=%.4f", qks_label_name(tagger, top[j]), p[top[j]]);
        printf("\n");
        printf("%s\n", qks_results_record(results, i, argv[2 + i], 0, -1.0, 1));
    }
    qks_results_free(results);
    qks_close(tagger);
    return failed;
}
