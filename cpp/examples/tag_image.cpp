// The C++ API in a few lines: tag images with a bundle, print the 5 most probable labels.
//
//     tag_image_cpp BUNDLE IMAGE...
#include <iostream>

#include "qks/qks.hpp"

int main(int argc, char** argv) {
    if (argc < 3) {
        std::cerr << "usage: " << argv[0] << " BUNDLE IMAGE...\n";
        return 2;
    }
    try {
        qks::Tagger tagger(argv[1]);                        // checks the bundle, loads ONNX Runtime
        for (int i = 2; i < argc; ++i) {
            qks::Result r = tagger.tag_file(argv[i]);
            if (!r.ok()) {
                std::cout << argv[i] << ": error: " << r.error << "\n";
                continue;
            }
            std::cout << argv[i] << ":";
            for (const auto& [label, p] : tagger.select(r, 5)) std::cout << " " << label << "=" << p;
            std::cout << "\n";
        }
    } catch (const qks::Error& e) {                          // a bad bundle, bank or runtime
        std::cerr << "tag_image_cpp: " << e.what() << "\n";
        return 2;
    }
}
