/* qks.h: the C ABI of libqks, for C, Rust, Go, C# and any language with a C FFI.
 *
 * Opaque handles, status codes and a message string; nothing is thrown across this boundary.
 * Every call that can fail returns a qks_status; on failure qks_last_error() gives a one-line
 * message for the calling thread (valid until that thread's next qks call). A tagger serves one
 * tag call at a time (use one tagger per thread); results are independent of their tagger.
 *
 *     qks_tagger* t = NULL;
 *     qks_options o;
 *     qks_options_init(&o);
 *     if (qks_open("bundle", &o, &t) != QKS_OK) { fprintf(stderr, "%s\n", qks_last_error()); return 2; }
 *     qks_results* r = NULL;
 *     const char* paths[] = {"cat.jpg"};
 *     if (qks_tag_files(t, paths, 1, &r) == QKS_OK) {
 *         const float* p = qks_results_probabilities(r, 0);     // NULL if this image failed
 *         ...
 *         qks_results_free(r);
 *     }
 *     qks_close(t);
 */
#ifndef QKS_H
#define QKS_H

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#define QKS_C_API __declspec(dllexport)
#else
#define QKS_C_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

typedef enum qks_status {
    QKS_OK = 0,
    QKS_ERROR_ARGUMENT = 1, /* a bad option or argument (NULL handle, unknown precision, ...) */
    QKS_ERROR_BUNDLE = 2,   /* the bundle is missing, tampered, foreign or incomplete */
    QKS_ERROR_LABELS = 3,   /* no such label bank, or label text that needs `qks-labels` first */
    QKS_ERROR_RUNTIME = 4,  /* ONNX Runtime could not be loaded or failed */
    QKS_ERROR_IMAGE = 5,    /* an image could not be read or decoded */
    QKS_ERROR_IO = 6,       /* an output could not be written */
    QKS_ERROR_INTERNAL = 7  /* a bug or out of memory */
} qks_status;

typedef struct qks_tagger qks_tagger;   /* a loaded bundle + image graph + label bank */
typedef struct qks_results qks_results; /* the outcome of one tag call: one entry per image */

typedef struct qks_options {
    const char* precision;   /* "auto" (NULL), "fp32", "fp16" or "int8" */
    int threads;             /* ONNX Runtime intra-op threads; 0: its default */
    const char* bank;        /* label bank name; NULL: the bundle's default bank */
    const char* labels_file; /* or a label list whose bank exists (qks-labels); NULL: none */
    const char* ort_library; /* libonnxruntime.so path; NULL: $QKS_ORT_LIBRARY, else the Python wheel's */
    int verify;              /* nonzero (default): check every bundle file's sha256 */
} qks_options;

QKS_C_API const char* qks_version(void);
QKS_C_API const char* qks_last_error(void);
QKS_C_API void qks_options_init(qks_options* options);

QKS_C_API qks_status qks_open(const char* bundle_dir, const qks_options* options, qks_tagger** out);
QKS_C_API void qks_close(qks_tagger* tagger); /* NULL is fine */

QKS_C_API size_t qks_label_count(const qks_tagger* tagger);
QKS_C_API const char* qks_label_name(const qks_tagger* tagger, size_t index); /* NULL if out of range */
/* The bank's per-label thresholds (qks-calibrate): qks_label_count floats in bank order, valid while
 * the tagger lives; NULL when the bank has none. */
QKS_C_API const float* qks_label_thresholds(const qks_tagger* tagger);
QKS_C_API size_t qks_queries(const qks_tagger* tagger);   /* Nq of the query features */
QKS_C_API size_t qks_dim(const qks_tagger* tagger);       /* D of the query features */
QKS_C_API size_t qks_image_size(const qks_tagger* tagger); /* the image graph's input H = W */
/* The image embedding's size (the graph's "embedding" output: the backbone's pooled image embedding,
 * L2-normalised, for similarity search and near-duplicates); 0 for a bundle exported before embeddings. */
QKS_C_API size_t qks_embedding_dim(const qks_tagger* tagger);
/* QKS_OK when the tagger's bundle has the embedding output, else QKS_ERROR_BUNDLE with a message that
 * names the bundle and says to re-export it with qks-export. */
QKS_C_API qks_status qks_require_embedding(const qks_tagger* tagger);

/* Tag image files in one engine batch; an image that cannot be decoded gets an error entry and
 * does not fail the call. */
QKS_C_API qks_status qks_tag_files(qks_tagger* tagger, const char* const* paths, size_t count,
                                   qks_results** out);
/* Tag one decoded RGB image: width x height pixels of 3 bytes, rows `stride` bytes apart (0: 3 * width). */
QKS_C_API qks_status qks_tag_rgb(qks_tagger* tagger, const uint8_t* rgb, int width, int height,
                                 size_t stride, qks_results** out);
/* The image graph's input for one file, float32 [3, size, size] (size = qks_image_size) into `out`. */
QKS_C_API qks_status qks_preprocess_file(const qks_tagger* tagger, const char* path, float* out,
                                         size_t out_count);

QKS_C_API size_t qks_results_count(const qks_results* results);
/* NULL when the image was tagged, else why not (the text of qks-infer's error record). */
QKS_C_API const char* qks_results_error(const qks_results* results, size_t index);
/* qks_label_count probabilities in bank order; NULL for an error entry. */
QKS_C_API const float* qks_results_probabilities(const qks_results* results, size_t index);
/* qks_queries x qks_dim raw query features; NULL for an error entry. */
QKS_C_API const float* qks_results_query_features(const qks_results* results, size_t index);
/* qks_embedding_dim floats, L2-normalised; NULL for an error entry or a bundle without embeddings. */
QKS_C_API const float* qks_results_embedding(const qks_results* results, size_t index);
/* qks-infer's label choice, most probable first: an explicit threshold >= 0 for every label; else
 * the bank's per-label thresholds (qks_label_thresholds) when it has them; else 0.5 unless top_k > 0.
 * Of the labels that pass, the top_k most probable (top_k > 0). Writes up to `capacity` label
 * indices and returns how many were chosen. */
QKS_C_API size_t qks_results_select(const qks_results* results, size_t index, int top_k, double threshold,
                                    size_t* label_indices, size_t capacity);
/* The JSONL record qks-infer writes for this entry (no newline); NULL on a bad index. Valid
 * until the next qks_results_record call for the same entry or qks_results_free. */
QKS_C_API const char* qks_results_record(qks_results* results, size_t index, const char* image_name, int top_k,
                                         double threshold, int all_scores);
QKS_C_API void qks_results_free(qks_results* results); /* NULL is fine */

#ifdef __cplusplus
}
#endif

#endif /* QKS_H */
