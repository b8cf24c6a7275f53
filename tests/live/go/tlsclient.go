// A Go HTTPS client for the TLS plaintext test (tests/live/test_tls_plaintext_go.py):
// waits for a line on stdin (the sensor has probed this binary by then), then sends each
// request (METHOD URL) on one keep-alive connection and prints each status.
package main

import (
	"bufio"
	"crypto/tls"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
)

func main() {
	tr := &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}
	client := &http.Client{Transport: tr}
	bufio.NewReader(os.Stdin).ReadString('\n')
	for i := 1; i+1 < len(os.Args); i += 2 {
		var body io.Reader
		if os.Args[i] == "POST" {
			body = strings.NewReader("name=value")
		}
		req, err := http.NewRequest(os.Args[i], os.Args[i+1], body)
		if err != nil {
			fmt.Println("error", err)
			os.Exit(1)
		}
		resp, err := client.Do(req)
		if err != nil {
			fmt.Println("error", err)
			os.Exit(1)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		fmt.Println(resp.StatusCode)
	}
}
